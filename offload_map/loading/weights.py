"""Which checkpoint fills which tensor: weights for components built on the meta device.

A component built without weights (``empty_model``, or accelerate's ``init_empty_weights``) has its
parameters on the ``meta`` device. ``dispatch_pipeline(..., weights={"transformer": path})`` names a
safetensors checkpoint for it; ``WeightSource`` checks, before anything is allocated, that every meta
tensor of those components is in its checkpoint with the right shape, and later reads each tensor
straight into its destination (a pinned host region, or a device tensor through one tensor-sized host
buffer). Tensors that are not on the meta device (buffers kept on the CPU) are packed as usual.
"""

from __future__ import annotations

import os

import torch

from ..collect.tensors import TensorRef
from ..planning.bind import ExecutionPlan
from .checkpoint import Checkpoint, CheckpointError


class WeightSource:
    """The checkpoint key of every meta tensor in ``plan``, validated against ``weights``.

    Args:
        plan: the bound execution plan.
        weights: component name -> checkpoint path (a ``.safetensors`` file or a model directory), or one
            path for the only component on the meta device (a lone DiT).

    Raises:
        CheckpointError: a meta tensor has no checkpoint, a checkpoint names no meta component, or a
            checkpoint does not match its component (missing tensor, other shape, corrupt or truncated).
    """

    def __init__(self, plan: ExecutionPlan, weights: "dict[str, str | os.PathLike] | str | os.PathLike | None") -> None:
        names = {c.name for c in plan.components}
        meta = _meta_tensors(plan)
        if isinstance(weights, (str, os.PathLike)):
            if len(meta) != 1:
                raise CheckpointError(
                    f"weights={str(weights)!r} is one path, but {len(meta)} components are on the meta "
                    f"device ({sorted(meta)}); pass a dict {{component: path}}"
                )
            weights = {next(iter(meta)): weights}
        weights = dict(weights or {})
        unknown = sorted(set(weights) - names)
        if unknown:
            raise CheckpointError(f"weights names {unknown}, which are not components of the pipeline {sorted(names)}")
        for comp in sorted(set(meta) - set(weights)):
            raise CheckpointError(
                f"{comp or 'the model'} has {len(meta[comp])} tensors on the meta device (e.g. {next(iter(meta[comp]))!r}) "
                f"and no checkpoint; pass weights={{{comp!r}: '<model directory or .safetensors>'}}"
            )
        for comp in sorted(set(weights) - set(meta)):
            raise CheckpointError(
                f"weights[{comp!r}] is given, but {comp or 'the model'} already holds its weights; build it on the meta "
                "device (offload_map.empty_model) to load it in place, or drop the entry"
            )
        self.keys: dict[int, tuple[Checkpoint, str]] = {}
        for comp, path in weights.items():
            checkpoint = Checkpoint(path)
            stored = _stored_names(checkpoint, meta[comp], comp)
            checkpoint.check(
                {key: (tuple(ref.tensor.shape), ref.tensor.dtype) for key, ref in stored.items()}, comp or "the model"
            )
            self.keys.update({id(ref): (checkpoint, key) for key, ref in stored.items()})

    def __bool__(self) -> bool:
        return bool(self.keys)

    def covers(self, ref: TensorRef) -> bool:
        """Whether ``ref`` is read from a checkpoint (it is on the meta device)."""
        return id(ref) in self.keys

    def read_into(self, ref: TensorRef, out: torch.Tensor) -> None:
        """Read ``ref``'s weights into ``out`` (a contiguous CPU tensor of its shape)."""
        checkpoint, key = self.keys[id(ref)]
        checkpoint.read_into(key, out)

    def mapped(self, ref: TensorRef) -> torch.Tensor | None:
        """``ref``'s weights as a copy-on-write view of its checkpoint file (``Checkpoint.mapped``), or None where the
        file does not hold them as ``ref`` lays them out (another dtype, not contiguous, an unaligned offset)."""
        checkpoint, key = self.keys[id(ref)]
        tensor = ref.local
        if checkpoint.tensors[key].dtype != tensor.dtype or not tensor.is_contiguous():
            return None
        return checkpoint.mapped(key)


def _meta_tensors(plan: ExecutionPlan) -> dict[str, dict[str, TensorRef]]:
    # component -> checkpoint key (the tensor's name inside its component) -> its slot
    out: dict[str, dict[str, TensorRef]] = {}
    for unit in plan.units.values():
        comp = plan.component_of(unit.path).name
        for ref in unit.tensors:
            if ref.tensor.is_meta:
                out.setdefault(comp, {})[_within(ref.qualname, comp)] = ref
    return out


def _within(qualname: str, comp: str) -> str:
    return qualname[len(comp) + 1 :] if comp else qualname


def _stored_names(checkpoint: Checkpoint, tensors: dict[str, TensorRef], comp: str) -> dict[str, TensorRef]:
    # A tensor tied between modules (T5's input embedding and ``shared``) is stored under one of its names, not
    # necessarily the one collection met first: look it up under each.
    out = {}
    for key, ref in tensors.items():
        names = [key, *(_within(f"{a.module_path}.{a.name}", comp) for a in ref.aliases)]
        out[next((name for name in names if name in checkpoint.tensors), key)] = ref
    return out


def empty_model(model_class: type, path: "str | os.PathLike", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A diffusers (or transformers) model built from ``path``'s ``config.json`` with every parameter on the meta
    device: no memory for weights. Pass it to ``dispatch_pipeline(..., weights={name: path})``.

    Args:
        model_class: e.g. ``diffusers.FluxTransformer2DModel`` (anything with ``load_config``/``from_config``,
            or transformers' ``config_class``/``_from_config``).
        path: the model directory (``config.json`` beside the safetensors shards).
        dtype: the parameters' dtype (the checkpoint's is converted on load); default: the class's default.

    Raises:
        CheckpointError: ``path`` has no ``config.json``.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> class Tiny(nn.Module):
        ...     @classmethod
        ...     def load_config(cls, path): return {"width": 4}
        ...     @classmethod
        ...     def from_config(cls, config): m = cls(); m.lin = nn.Linear(config["width"], 2); return m
        >>> d = tempfile.mkdtemp(); open(d + "/config.json", "w").write("{}")
        2
        >>> empty_model(Tiny, d).lin.weight.device
        device(type='meta')
    """
    from accelerate import init_empty_weights

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(
            f"{path} has no config.json; build the model on the meta device yourself "
            "(accelerate.init_empty_weights) and pass its safetensors file"
        )
    with init_empty_weights():
        if hasattr(model_class, "load_config"):
            model = model_class.from_config(model_class.load_config(path))
        else:
            model = model_class._from_config(model_class.config_class.from_pretrained(path))
    if hasattr(model, "tie_weights"):  # transformers ties on load; its checkpoints store one name per tied tensor
        model.tie_weights()
    return model.to(dtype) if dtype is not None else model
