"""The tensors of a pipeline: every parameter and buffer once, where it sits, and where else it appears.

A ``TensorRef`` names one parameter or buffer slot of a module; rebinding that slot is how weights move. A
``DTensor`` (HSDP, tensor parallelism) moves by its local shard: its ``local`` tensor is what is packed and
streamed, and binding replaces the shard under the same ``DTensor``, so its mesh and placements stay.
The same tensor held by several modules (a tied weight, a shared buffer) is one ``TensorRef`` whose
``aliases`` list the other slots; they are always rebound together, so ties survive dispatch and restore.
``TensorRef.bind`` is the one primitive that points module slots at memory; in the runtime only the
owner of a unit calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .components import PipelineModules


@dataclass(frozen=True)
class Alias:
    """Another slot holding the same tensor: its module, attribute name, kind, and the module's path."""

    module: nn.Module
    name: str
    is_param: bool
    module_path: str


@dataclass(frozen=True, eq=False)
class TensorRef:
    """A parameter or buffer slot of a module.

    Attributes:
        module: the module holding the slot.
        name: the attribute name in ``module._parameters`` or ``module._buffers``.
        is_param: parameter (True) or buffer.
        qualname: the full dotted name from the pipeline (``"transformer.blocks.0.attn.to_q.weight"``).
        module_path: the dotted path of ``module`` (``"transformer.blocks.0.attn.to_q"``).
        aliases: the other slots holding the same tensor.
    """

    module: nn.Module
    name: str
    is_param: bool
    qualname: str
    module_path: str
    aliases: list[Alias] = field(default_factory=list)

    @property
    def tensor(self) -> torch.Tensor:
        return (self.module._parameters if self.is_param else self.module._buffers)[self.name]

    @property
    def local(self) -> torch.Tensor:
        """The tensor's bytes on this rank: the tensor itself, or a ``DTensor``'s local shard."""
        return local_tensor(self.tensor)

    @property
    def nbytes(self) -> int:
        tensor = self.local
        return tensor.numel() * tensor.element_size()

    def slots(self) -> list[tuple[nn.Module, str, bool]]:
        """``(module, name, is_param)`` of the slot and of each alias."""
        return [(self.module, self.name, self.is_param), *((a.module, a.name, a.is_param) for a in self.aliases)]

    def bind(self, data: torch.Tensor) -> None:
        """Point the slot (and its aliases) at ``data``. Parameters keep their identity (optimizers, LoRA and
        compiled graphs hold them), except across the meta device, which ``.data`` cannot cross: one new
        ``Parameter`` then takes every slot."""
        fresh = None
        current = self.tensor
        if is_dtensor(current) and not is_dtensor(data):  # the shard changes; the DTensor (mesh, placements) stays
            current._local_tensor = data
            return
        for module, name, is_param in self.slots():
            if not is_param:
                module._buffers[name] = data
                continue
            param = module._parameters[name]
            if param.is_meta == data.is_meta:
                param.data = data
                continue
            if fresh is None:
                fresh = nn.Parameter(data, requires_grad=param.requires_grad)
            module._parameters[name] = fresh


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (without importing torch.distributed)."""
    return hasattr(tensor, "_local_tensor") and hasattr(tensor, "device_mesh")


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or its local shard when it is a ``DTensor``."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def collect_tensors(found: PipelineModules) -> list[TensorRef]:
    """Every tensor of ``found``'s components once, in module order, with its aliases.

    Example:
        >>> from torch import nn
        >>> from offload_map.collect.components import ModuleDiscovery
        >>> dit = nn.Module(); dit.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
        >>> dit.blocks[1].weight = dit.blocks[0].weight
        >>> refs = collect_tensors(ModuleDiscovery.discover(dit))
        >>> [(r.qualname, [a.module_path for a in r.aliases]) for r in refs]
        [('blocks.0.weight', ['blocks.1']), ('blocks.0.bias', []), ('blocks.1.bias', [])]
    """
    refs: list[TensorRef] = []
    seen: dict[int, TensorRef] = {}
    for comp in found.components.values():
        for sub, module in comp.module.named_modules(remove_duplicate=False):
            path = f"{comp.name}.{sub}".strip(".")
            for is_param, table in ((True, module._parameters), (False, module._buffers)):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    first = seen.get(id(tensor))
                    if first is None:
                        seen[id(tensor)] = ref = TensorRef(module, name, is_param, f"{path}.{name}".lstrip("."), path)
                        refs.append(ref)
                    elif not (first.module is module and first.name == name) and not any(
                        a.module is module and a.name == name for a in first.aliases
                    ):
                        first.aliases.append(Alias(module, name, is_param, path))
    return refs
