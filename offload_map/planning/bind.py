"""Binding a device map to a pipeline: resolve paths, check every rule, and list what moves where.

``bind(dmap, found, tensors)`` is the last step before the runtime: it resolves each entry to its module,
gives each entry the tensors it owns (``mapping.ownership``), checks the placement rules, and orders each
streamed block's tensors for packing. It reads module structure and tensor metadata only: it never copies
data or touches a device, so every user error is raised before anything moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..collect.components import PipelineModules, Role
from ..collect.tensors import TensorRef
from ..mapping.device_map import DeviceMap, check_compressed_paths
from ..mapping.ownership import assign_tensors, entry_module, owning_component, within
from ..mapping.placement import Placement


@dataclass
class Unit:
    """The tensors of one device map entry, moved together."""

    path: str
    placement: Placement
    module: nn.Module
    tensors: list[TensorRef]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Ring:
    """A component's streamed blocks (declaration order) sharing ``window`` device slots."""

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
    compression: dict[str, str] = field(default_factory=dict)  # streamed block path -> how it is kept and copied

    def component_of(self, path: str) -> ComponentPlan:
        names = {c.name: c.role for c in self.components}
        name = owning_component(path, names)
        return next(c for c in self.components if c.name == name)


def bind(dmap: DeviceMap, found: PipelineModules, tensors: list[TensorRef]) -> ExecutionPlan:
    """Check ``dmap`` against a pipeline (its components ``found`` and their ``tensors``, from the collect stage)
    and resolve it into an ``ExecutionPlan``.

    Raises:
        ValueError: an entry names no module of the pipeline, a tensor is covered by no entry, a placement is
            not allowed where it stands (``"layer-window"`` off a block of a block list, ``"cpu-pinned"`` below
            a component, entries other than ``"gpu"`` nested in a streamed block), a streamed block holds
            no tensor, or recorded bytes differ from the pipeline's (the map was made for another model).
    """
    comps = {c.name: c for c in found.components.values()}
    unknown = sorted(set(dmap.components) ^ set(comps))
    if unknown:
        raise ValueError(
            f"device map components {sorted(dmap.components)} do not match the pipeline's {sorted(comps)} "
            f"(differ in {unknown}); compile a new map with compile_device_map(pipe)"
        )
    modules = {path: entry_module(path, comps, dmap.components) for path in dmap.entries}
    owned = assign_tensors(dmap.placements(), tensors)
    units = {path: Unit(path, e.placement, modules[path], owned[path]) for path, e in dmap.entries.items()}
    plan = ExecutionPlan(torch.device(dmap.device), dmap.window, [], units=units)
    for name, comp in comps.items():
        root = dmap.entries.get(name)
        if root is None:
            raise ValueError(f"component {name or '<root>'!r} has no entry of its own; add one (e.g. {name!r}: 'gpu')")
        plan.components.append(ComponentPlan(name, comp.module, dmap.components[name], root.placement))
    streamed = _check_rules(dmap, comps, units)
    _check_not_hollow(units, comps)
    check_compressed_paths(dmap.compression, found)
    _check_sizes(dmap, comps, units)
    for unit in units.values():
        if unit.placement is Placement.GPU:
            plan.resident.append(unit)
        elif unit.placement is Placement.CPU_PINNED:
            plan.pinned.append(unit)
    for comp_name, block_paths in streamed.items():
        for path in block_paths:
            unit = units[path]
            order = block_order([r.qualname for r in unit.tensors], [r.nbytes for r in unit.tensors], path)
            unit.tensors[:] = [unit.tensors[i] for i in order]
        plan.rings.append(Ring(comp_name, [units[p] for p in block_paths], min(dmap.window, len(block_paths))))
        # A block the map names but does not stream (a plan kept it whole) has nothing to code.
        plan.compression.update((p, dmap.compression_of(p)) for p in block_paths if dmap.compression_of(p))
    return plan


def _check_not_hollow(units: dict[str, Unit], comps) -> None:
    # An entry above others that owns no tensor (a block list placed "gpu" while its blocks stay "layer-window")
    # would change nothing: the entries inside it decide. Where they agree with it, nothing is lost.
    for path, unit in units.items():
        if path in comps or unit.tensors:
            continue
        other = [p for p, u in units.items() if within(p, path) and p != path and u.placement is not unit.placement]
        if other:
            raise ValueError(
                f"device map entry {path!r} ({unit.placement.value!r}) holds no tensor of its own: the entries inside it "
                f"decide, and {len(other)} of them say otherwise ({', '.join(repr(p) for p in other[:3])}"
                f"{', ...' if len(other) > 3 else ''}). Delete those (del map[{other[0]!r}], ...) for {path!r}'s "
                "placement to cover them"
            )


def direct_child(qualname: str, path: str) -> str | None:
    """The direct submodule of block ``path`` that holds tensor ``qualname``; None for the block's own tensors
    (and for a tensor outside the block)."""
    if not qualname.startswith(path + "."):
        return None
    name, dot, _ = qualname[len(path) + 1 :].partition(".")
    return name if dot else None


def block_order(qualnames: list[str], sizes: list[int], path: str) -> list[int]:
    """The order in which block ``path`` packs its tensors (``qualnames``, of ``sizes`` bytes): grouped by direct
    submodule, largest submodule first, the block's own tensors last.

    A plan may keep a leading run of whole submodules on the device and stream the rest
    (``runtime.host_buffer.split_points``); largest first leaves the finest choice of streamed sizes at the small end,
    where a part is about what the link moves while the block computes.
    """
    child = [direct_child(qualname, path) for qualname in qualnames]
    total: dict[str, int] = {}
    for name, size in zip(child, sizes):
        if name is not None:
            total[name] = total.get(name, 0) + size
    first = {name: i for i, name in reversed(list(enumerate(child)))}
    return sorted(range(len(qualnames)), key=lambda i: (child[i] is None, -total.get(child[i], 0), first.get(child[i], 0), i))


def _check_sizes(dmap: DeviceMap, comps: dict, units: dict[str, Unit]) -> None:
    # Per component, so that splitting an entry (a new nested entry records 0 bytes) stays valid. A block entry
    # removed from the map leaves its bytes to the entries around it: that is an edit, not another model.
    recorded: dict[str, int] = {}
    actual: dict[str, int] = {}
    for path, unit in units.items():
        comp = owning_component(path, dmap.components)
        recorded[comp] = recorded.get(comp, 0) + dmap.entries[path].nbytes
        actual[comp] = actual.get(comp, 0) + unit.nbytes
    for comp, nbytes in recorded.items():
        if not nbytes or nbytes == actual[comp]:
            continue
        blocks = comps[comp].known_blocks()
        removed = sum(_subtree_bytes(block) for path, block in blocks if path not in dmap.entries)
        if removed and nbytes + removed == actual[comp]:
            continue
        raise ValueError(
            f"the device map records {nbytes} bytes for component {comp!r} but the pipeline's holds "
            f"{actual[comp]}; the map was made for another model (or another dtype): compile a new one with "
            "compile_device_map(pipe), or edit that one"
        )


def _subtree_bytes(module: nn.Module) -> int:
    seen = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _check_rules(dmap: DeviceMap, comps: dict, units: dict[str, Unit]) -> dict[str, list[str]]:
    block_paths: dict[str, list[str]] = {}
    for name, comp in comps.items():
        if any(u.placement is Placement.LAYER_WINDOW for p, u in units.items() if owning_component(p, dmap.components) == name):
            block_paths[name] = [path for path, _ in comp.blocks()]
    streamed: dict[str, list[str]] = {}
    for path, unit in units.items():
        comp = owning_component(path, dmap.components)
        if unit.placement is Placement.CPU_PINNED:
            if path != comp:
                raise ValueError(
                    f"device map entry {path!r}: 'cpu-pinned' applies to whole components ({comp!r}), not to a module inside one"
                )
        elif unit.placement is Placement.LAYER_WINDOW:
            if path not in block_paths.get(comp, ()):
                blocks = block_paths.get(comp)
                found = (
                    f"{comp!r} blocks are {blocks[:3]}{'...' if len(blocks) > 3 else ''}"
                    if blocks
                    else f"{comp!r} ({type(comps[comp].module).__name__}) has no block lists: declare them on its class, "
                    f"e.g. _layerwise_offload_blocks_attrs = ['encoder.block'], or place it 'cpu-pinned'"
                )
                raise ValueError(
                    f"device map entry {path!r}: 'layer-window' applies only to blocks of a component's block lists; {found}"
                )
            moving = [p for p, u in units.items() if p != path and within(p, path) and u.placement is not Placement.GPU]
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
