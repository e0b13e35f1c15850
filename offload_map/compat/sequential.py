"""vllm-omni's sequential offload of loose modules: ``apply_sequential_offload``, ``sequential_offload_component``,
``remove_sequential_offload``, on offload_map's ``"cpu-pinned"`` placement (``dispatch_pipeline(..., "model")``)."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Iterator

import torch
from torch import nn

from ..dispatch import OffloadHandle, dispatch_pipeline
from ..mapping.compiler import compile_device_map
from ..mapping.placement import Placement

_SEQUENTIAL_ATTR = "_offload_map_sequential"


class _ModuleSet:
    """A pipeline-like holder for loose modules, named so that discovery gives each its role."""

    def __init__(self, dits: list[nn.Module], encoders: list[nn.Module]) -> None:
        for i, module in enumerate(dits):
            setattr(self, f"transformer_{i}", module)
        for i, module in enumerate(encoders):
            setattr(self, f"text_encoder_{i}", module)

    def name_of(self, module: nn.Module) -> str:
        return next(name for name, value in vars(self).items() if value is module)


def apply_sequential_offload(
    dit_modules: list[nn.Module],
    encoder_modules: list[nn.Module],
    device: torch.device,
    pin_memory: bool = True,
    use_hsdp: bool = False,
    *,
    offload_initial_dits: bool = False,
    offload_dit_modules: Collection[nn.Module] | None = None,
    offload_encoder_modules: Collection[nn.Module] | None = None,
    persistent_dit_staging: bool = False,
) -> None:
    """Apply sequential offloading hooks to DiT and encoder modules.

    Before a DiT runs, the encoders and every other DiT leave the device; before an encoder runs, the DiTs
    leave. Host copies are packed once (pinned when ``pin_memory``); with ``use_hsdp`` copies are blocking.

    Args:
        dit_modules: DiT/transformer modules.
        encoder_modules: encoder modules (a VAE may be listed here too).
        device: target device.
        pin_memory: pin host copies for faster, asynchronous transfers.
        use_hsdp: HSDP is on (copies become blocking).
        offload_initial_dits: start with the DiTs off the device (by default the first DiT is on it, as vllm-omni
            leaves DiTs where they were).
        offload_dit_modules, offload_encoder_modules: the modules that take turns (default: all); the others
            stay on the device.
        persistent_dit_staging: not supported (vllm-omni's fixed DiT staging buffer, for CUDA graphs).

    Raises:
        ValueError: a module is listed twice, or in both lists, both lists are empty, a subset names a module of
            neither list, or ``persistent_dit_staging`` is set.
        RuntimeError: a module is already under offload hooks.

    Example:
        >>> from offload_map.demo import make_tiny_pipeline
        >>> pipe = make_tiny_pipeline()
        >>> apply_sequential_offload([pipe.transformer], [pipe.text_encoder, pipe.vae], torch.device("cpu"))
        >>> remove_sequential_offload([pipe.transformer, pipe.text_encoder, pipe.vae])
    """
    dits, encoders = list(dit_modules), list(encoder_modules)
    ids = [id(m) for m in dits + encoders]
    if len(set(ids)) != len(ids):
        raise ValueError(
            "a module appears more than once in dit_modules/encoder_modules; each module may be listed once, in one list"
        )
    if not ids:
        raise ValueError("apply_sequential_offload needs at least one module in dit_modules or encoder_modules")
    if persistent_dit_staging:
        raise ValueError(
            "persistent_dit_staging=True is not supported: offload_map gives a DiT no fixed device buffer "
            "(vllm-omni's staging keeps CUDA-graph pointers valid); leave it False"
        )
    for module in dits + encoders:
        if not isinstance(module, nn.Module):
            raise ValueError(f"expected nn.Module entries, got {type(module).__name__}")
        if _SEQUENTIAL_ATTR in module.__dict__:
            raise RuntimeError(
                f"{type(module).__name__} is already under sequential offload; call remove_sequential_offload first"
            )
    moving = {id(m) for m in (dits if offload_dit_modules is None else offload_dit_modules)}
    moving |= {id(m) for m in (encoders if offload_encoder_modules is None else offload_encoder_modules)}
    if not moving <= set(ids):
        raise ValueError("offload_dit_modules/offload_encoder_modules name a module that is in neither list")
    holder = _ModuleSet(dits, encoders)
    dmap = compile_device_map(holder, "model", device)
    for module in dits + encoders:
        if id(module) not in moving:
            dmap[holder.name_of(module)] = Placement.GPU
    handle = dispatch_pipeline(holder, device_map=dmap, pin_memory=pin_memory, blocking=use_hsdp)
    for module in dits + encoders:
        module.__dict__[_SEQUENTIAL_ATTR] = handle
    if not offload_initial_dits and dits:
        handle.runtime.activate(holder.name_of(dits[0]))


@contextlib.contextmanager
def sequential_offload_component(module: nn.Module) -> Iterator[None]:
    """Run code that uses ``module`` outside its forward: on entry it is brought onto the device (what it excludes
    leaves), on exit, even by an exception, it leaves again if it takes turns.

    Raises:
        RuntimeError: ``module`` is not under sequential offload.

    Example:
        >>> from offload_map.demo import make_tiny_pipeline
        >>> pipe = make_tiny_pipeline()
        >>> apply_sequential_offload([pipe.transformer], [pipe.text_encoder], torch.device("cpu"))
        >>> with sequential_offload_component(pipe.text_encoder):
        ...     weight = pipe.text_encoder.layers[0].weight
        >>> remove_sequential_offload([pipe.transformer, pipe.text_encoder])
    """
    handle = module.__dict__.get(_SEQUENTIAL_ATTR)
    if handle is None:
        raise RuntimeError(f"{type(module).__name__} has no sequential offload hook")
    name = handle.pipeline.name_of(module)
    handle.runtime.activate(name)
    try:
        yield
    finally:
        handle.runtime.release(name)


def remove_sequential_offload(modules: Iterable) -> None:
    """Remove sequential offloading hooks from modules (nested lists allowed); modules stay where they are.

    The hooks of every module that was offloaded together with any of ``modules`` are removed.

    Example:
        >>> from offload_map.demo import make_tiny_pipeline
        >>> pipe = make_tiny_pipeline()
        >>> apply_sequential_offload([pipe.transformer], [pipe.text_encoder], torch.device("cpu"))
        >>> remove_sequential_offload([[pipe.transformer], [pipe.text_encoder]])
    """
    handles: dict[int, OffloadHandle] = {}
    for module in _flatten(modules):
        handle = module.__dict__.get(_SEQUENTIAL_ATTR)
        if handle is not None:
            handles[id(handle)] = handle
    for handle in handles.values():
        for module in vars(handle.pipeline).values():
            if isinstance(module, nn.Module):
                module.__dict__.pop(_SEQUENTIAL_ATTR, None)
        handle.detach()


def _flatten(items) -> Iterable[nn.Module]:
    for item in items:
        if isinstance(item, nn.Module):
            yield item
        else:
            yield from _flatten(item)
