"""Binding a device map to a pipeline: resolve paths, check every rule, and list what moves where.

``bind(dmap, pipeline)`` is the last step before the runtime and the only place that decides which tensor
belongs to which entry. It reads module structure and tensor metadata only: it never copies data or
touches a device, so every user error is raised before anything moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import get_blocks
from .device_map import DeviceMap, owning_component
from .module_collector import ModuleDiscovery
from .placement import Placement, Role


@dataclass(frozen=True, eq=False)
class TensorRef:
    """A parameter or buffer slot of a module (rebinding its ``.data`` is how weights move).

    ``aliases`` are the other ``(module, name, is_param)`` slots holding the same tensor (a buffer shared by
    two modules, a tied weight); they are rebound together, so the tie survives dispatch and ``remove()``.
    """

    module: nn.Module
    name: str
    is_param: bool
    qualname: str
    aliases: list = field(default_factory=list)

    @property
    def tensor(self) -> torch.Tensor:
        return (self.module._parameters if self.is_param else self.module._buffers)[self.name]

    def bind(self, data: torch.Tensor) -> None:
        """Point the slot (and its aliases) at ``data``; parameters keep their identity (optimizers, LoRA),
        except across the meta device, which ``.data`` cannot cross: one new ``Parameter`` then takes every slot."""
        fresh = None
        for module, name, is_param in [(self.module, self.name, self.is_param), *self.aliases]:
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


@dataclass
class Unit:
    """The tensors of one device map entry, moved together."""

    path: str
    placement: Placement
    module: nn.Module
    tensors: list[TensorRef]

    @property
    def nbytes(self) -> int:
        return sum(t.tensor.numel() * t.tensor.element_size() for t in self.tensors)


@dataclass
class Ring:
    """A DiT's streamed blocks (declaration order) sharing ``window`` device slots."""

    component: str
    blocks: list[Unit]
    window: int


@dataclass
class ComponentPlan:
    name: str
    module: nn.Module
    role: Role
    placement: Placement


@dataclass
class ExecutionPlan:
    """Everything the runtime needs, resolved to modules and tensors."""

    device: torch.device
    window: int
    components: list[ComponentPlan]
    resident: list[Unit] = field(default_factory=list)
    pinned: list[Unit] = field(default_factory=list)
    rings: list[Ring] = field(default_factory=list)
    units: dict[str, Unit] = field(default_factory=dict)

    def component_of(self, path: str) -> ComponentPlan:
        names = {c.name: c.role for c in self.components}
        name = owning_component(path, names)
        return next(c for c in self.components if c.name == name)


def bind(dmap: DeviceMap, pipeline: object) -> ExecutionPlan:
    """Check ``dmap`` against ``pipeline`` and resolve it into an ``ExecutionPlan``.

    Raises:
        ValueError: an entry names no module of the pipeline, a tensor is covered by no entry, a placement is
            not allowed where it stands (``"layer-window"`` off a DiT block, ``"cpu-pinned"`` below a
            component, entries nested inside a pinned component, entries other than ``"gpu"`` nested in a
            streamed block), a streamed block holds
            no tensor, or recorded bytes differ from the pipeline's (the map was made for another model).
    """
    found = ModuleDiscovery.discover(pipeline)
    comps = {c.name: c for c in found.components.values()}
    unknown = sorted(set(dmap.components) ^ set(comps))
    if unknown:
        raise ValueError(
            f"device map components {sorted(dmap.components)} do not match the pipeline's {sorted(comps)} "
            f"(differ in {unknown}); compile a new map with compile_device_map(pipe)"
        )
    modules = {path: _resolve(path, comps, dmap) for path in dmap.entries}
    units = {path: Unit(path, e.placement, modules[path], []) for path, e in dmap.entries.items()}
    _assign_tensors(found, dmap, units)
    plan = ExecutionPlan(torch.device(dmap.device), dmap.window, [], units=units)
    for name, comp in comps.items():
        root = dmap.entries.get(name)
        if root is None:
            raise ValueError(f"component {name or '<root>'!r} has no entry of its own; add one (e.g. {name!r}: 'gpu')")
        plan.components.append(ComponentPlan(name, comp.module, dmap.components[name], root.placement))
    streamed = _check_rules(dmap, comps, units)
    _check_sizes(dmap, units)
    for path, unit in units.items():
        if unit.placement is Placement.GPU:
            plan.resident.append(unit)
        elif unit.placement is Placement.CPU_PINNED:
            plan.pinned.append(unit)
    for comp_name, block_paths in streamed.items():
        for path in block_paths:
            unit = units[path]
            order = block_order([r.qualname for r in unit.tensors], [r.tensor.nbytes for r in unit.tensors], path)
            unit.tensors[:] = [unit.tensors[i] for i in order]
        plan.rings.append(Ring(comp_name, [units[p] for p in block_paths], min(dmap.window, len(block_paths))))
    return plan


def direct_child(qualname: str, path: str) -> str | None:
    """The direct submodule of block ``path`` that holds tensor ``qualname``; None for the block's own tensors
    (and for a tensor outside the block)."""
    if not qualname.startswith(path + "."):
        return None
    name, dot, _ = qualname[len(path) + 1:].partition(".")
    return name if dot else None


def block_order(qualnames: list[str], sizes: list[int], path: str) -> list[int]:
    """The order in which block ``path`` packs its tensors (``qualnames``, of ``sizes`` bytes): grouped by direct
    submodule, largest submodule first, the block's own tensors last.

    A plan may keep a leading run of whole submodules on the device and stream the rest
    (``PackedTensors.split_points``); largest first leaves the finest choice of streamed sizes at the small end,
    where a part is about what the link moves while the block computes.
    """
    child = [direct_child(qualname, path) for qualname in qualnames]
    total: dict[str, int] = {}
    for name, size in zip(child, sizes):
        if name is not None:
            total[name] = total.get(name, 0) + size
    first = {name: i for i, name in reversed(list(enumerate(child)))}
    return sorted(range(len(qualnames)), key=lambda i: (child[i] is None, -total.get(child[i], 0), first.get(child[i], 0), i))


def _resolve(path: str, comps: dict, dmap: DeviceMap) -> nn.Module:
    if path and "" in path.split("."):
        raise ValueError(f"device map entry {path!r} has an empty name between dots; write module paths like 'transformer.blocks.0'")
    try:
        comp = owning_component(path, dmap.components)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    rel = path[len(comp) + 1:] if comp else path
    try:
        return comps[comp].module.get_submodule(rel) if rel else comps[comp].module
    except AttributeError:
        raise ValueError(f"device map entry {path!r} names no module of the pipeline (component {comp!r} has no {rel!r})") from None


def _assign_tensors(found, dmap: DeviceMap, units: dict[str, Unit]) -> None:
    seen: dict[int, TensorRef | None] = {}
    uncovered = []
    for comp in found.components.values():
        for mod_path, module in comp.module.named_modules(remove_duplicate=False):
            base = f"{comp.name}.{mod_path}".strip(".")
            for is_param, table in ((True, module._parameters), (False, module._buffers)):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    if id(tensor) in seen:  # the same tensor again: one copy, bound everywhere it appears
                        _share(seen[id(tensor)], module, name, is_param, _longest_prefix(base, units), units)
                        continue
                    qual = f"{base}.{name}".lstrip(".")
                    owner = _longest_prefix(base, units)
                    ref = None if owner is None else TensorRef(module, name, is_param, qual)
                    seen[id(tensor)] = ref
                    if ref is None:
                        uncovered.append(qual)
                    else:
                        units[owner].tensors.append(ref)
    if uncovered:
        raise ValueError(
            f"{len(uncovered)} tensors are covered by no device map entry, e.g. {uncovered[:3]}; "
            "add an entry for their component (or one of its modules)"
        )


def _share(ref: TensorRef | None, module: nn.Module, name: str, is_param: bool, path: str | None, units: dict) -> None:
    if ref is None or any(m is module and n == name for m, n, _ in [(ref.module, ref.name, ref.is_param), *ref.aliases]):
        return
    ref.aliases.append((module, name, is_param))
    owner = next(p for p, u in units.items() if any(t is ref for t in u.tensors))
    if path is None or path == owner or units[owner].placement is Placement.GPU:
        return
    if units[path].placement is Placement.GPU:  # a resident copy serves both places
        units[owner].tensors.remove(ref)
        units[path].tensors.append(ref)
        return
    raise ValueError(
        f"{ref.qualname} is shared with {path!r} ({name}), but {owner!r} is {units[owner].placement.value!r} and "
        f"{path!r} is {units[path].placement.value!r}: a shared tensor can only move once. Place one of them 'gpu'"
    )


def _check_sizes(dmap: DeviceMap, units: dict[str, Unit]) -> None:
    # Per component, so that splitting an entry (a new nested entry records 0 bytes) stays valid.
    recorded: dict[str, int] = {}
    actual: dict[str, int] = {}
    for path, unit in units.items():
        comp = owning_component(path, dmap.components)
        recorded[comp] = recorded.get(comp, 0) + dmap.entries[path].nbytes
        actual[comp] = actual.get(comp, 0) + unit.nbytes
    for comp, nbytes in recorded.items():
        if nbytes and nbytes != actual[comp]:
            raise ValueError(
                f"the device map records {nbytes} bytes for component {comp!r} but the pipeline's holds "
                f"{actual[comp]}; the map was made for another model: compile a new one"
            )


def _longest_prefix(path: str, units: dict) -> str | None:
    while True:
        if path in units:
            return path
        if not path:
            return None
        path = path.rpartition(".")[0]


def _check_rules(dmap: DeviceMap, comps: dict, units: dict[str, Unit]) -> dict[str, list[str]]:
    block_paths: dict[str, list[str]] = {}
    for name, comp in comps.items():
        if dmap.components[name] is Role.DIT and any(u.placement is Placement.LAYER_WINDOW for p, u in units.items() if owning_component(p, dmap.components) == name):
            block_paths[name] = [f"{name}.{p}".lstrip(".") for p, _ in get_blocks(comp.module)]
    streamed: dict[str, list[str]] = {}
    for path, unit in units.items():
        comp = owning_component(path, dmap.components)
        inner = [p for p in units if p != path and (not path or p.startswith(path + "."))]
        if unit.placement is Placement.CPU_PINNED:
            if path != comp:
                raise ValueError(f"device map entry {path!r}: 'cpu-pinned' applies to whole components ({comp!r}), not to a module inside one")
            if inner:
                raise ValueError(f"device map entry {inner[0]!r} is inside the 'cpu-pinned' component {path!r}, which moves as a whole; remove the inner entry")
        elif unit.placement is Placement.LAYER_WINDOW:
            if path not in block_paths.get(comp, ()):
                raise ValueError(
                    f"device map entry {path!r}: 'layer-window' applies only to blocks of a DiT's block lists; "
                    f"{comp!r} blocks are {block_paths.get(comp, [])[:3]}..."
                )
            moving = [p for p in inner if units[p].placement is not Placement.GPU]
            if moving:
                raise ValueError(
                    f"device map entry {moving[0]!r} is inside the streamed block {path!r}: only 'gpu' entries (parts "
                    "of the block kept on the device while the rest streams) may be nested in a block; place it 'gpu'"
                )
            if not unit.tensors:
                raise ValueError(f"block {path!r} holds no parameters or buffers, so it cannot be streamed; place it 'gpu'")
    for comp, paths in block_paths.items():
        streamed[comp] = [p for p in paths if p in units and units[p].placement is Placement.LAYER_WINDOW]
    return streamed
