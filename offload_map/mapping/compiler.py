"""Compiling a pipeline into a device map for a named strategy.

Strategies:

- ``"none"``: every component resident (``"gpu"``).
- ``"model"``: DiTs, encoders and VAEs ``"cpu-pinned"``, taking turns on the device (a DiT excludes the
  encoders, the VAEs and every other DiT); other components and ``_resident_modules`` stay ``"gpu"``.
- ``"layerwise"``: as ``"model"``, except that each DiT, and each other offloaded component with block lists
  and at least ``STREAM_MIN_BYTES`` of weights (a T5-XXL or a Llama text encoder, not CLIP-L or a VAE), has its
  blocks ``"layer-window"``, streamed through ``window`` slots. Its weights outside the blocks (embeddings,
  norms, projections) are ``"cpu-pinned"`` with the component: on the device while it runs, gone while a
  component it excludes runs, so UMT5's 2-4 GB of embeddings do not sit beside the DiT for every step. They
  are ``"gpu"`` instead where no other component takes turns with it (a lone DiT), or where a block shares a
  tensor with them, or another component does (a tied weight, a module registered twice): a shared tensor moves
  once, and must be on the device wherever it is used.
- ``"auto"`` (needs a budget): everything ``"gpu"`` if the whole pipeline fits the budget, else as
  ``"layerwise"``; the blocks to keep resident are chosen after the second forward (``offload_map.auto``).

With a budget (``"auto"`` or ``"layerwise"``), encoders and VAEs are placed one by one: smallest first,
each stays ``"gpu"`` while it fits beside the largest DiT held entirely resident (a resident encoder saves a
load per prompt, a resident block saves a copy per step, so blocks come first); the rest are
``"cpu-pinned"``. The window then shrinks (down to 1) until every phase fits: the resident weights, and the
slots and non-block weights of each streamed component while it runs. A component moved whole that is too large
to run within the budget beside what stays resident is reported with a warning (it still runs).
"""

from __future__ import annotations

import logging

from ..collect.components import PipelineModules, Role, discover_components
from ..collect.tensors import TensorRef, collect_tensors
from .device_map import DeviceMap, check_compressed_paths, check_compression, check_window
from .devices import resolve_device
from .memory import ACTIVATION_SHARE, BudgetTooSmall, device_footprint, fits_entirely, staging_footprint
from .ownership import assign_tensors, owning_component, within
from .placement import Placement
from .sizes import budget_key, human_bytes

logger = logging.getLogger("offload_map")

STRATEGIES = ("none", "model", "layerwise", "auto")
# Components other than DiTs stream under "layerwise" from this size on; smaller ones move whole, which costs
# one copy per call and a few hundred MB of device memory at most.
STREAM_MIN_BYTES = 1 << 30


def check_strategy(strategy: object) -> str:
    """Return the strategy name for ``strategy`` (a name or an ``OffloadStrategy``), or raise a ValueError."""
    name = getattr(strategy, "value", strategy)
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(map(repr, STRATEGIES))}")
    return name


def compile_device_map(
    pipeline: object,
    strategy: str = "model",
    device=None,
    window: int = 2,
    budget: int | None = None,
    compression: "str | dict[str, str] | None" = None,
) -> DeviceMap:
    """Compile ``pipeline`` into a ``DeviceMap`` for ``strategy`` (see the module docstring).

    Args:
        pipeline: a diffusers pipeline, an object holding ``nn.Module``s, or an ``nn.Module``.
        strategy: ``"none"``, ``"model"``, ``"layerwise"`` or ``"auto"`` (with a budget).
        device: target device; ``None`` picks this rank's GPU, or the CPU without one. A GPU need not be present:
            a map compiled here may be saved and dispatched on another machine.
        window: device slots per streamed DiT (``"layerwise"``); more than the blocks means all resident.
        budget: device bytes the map may use (``"auto"``, ``"layerwise"``), e.g. from ``sizes.parse_size``.
        compression: the map's ``DeviceMap.compression``; a budget then leaves room for the staging buffers.

    Returns:
        The map, with each entry's bytes and dtype filled in. Nothing has moved.

    Raises:
        ValueError: unknown strategy, bad window or device, or a DiT without blocks under ``"layerwise"``.
        BudgetTooSmall: the budget cannot hold the resident weights and one slot.

    Example:
        >>> from offload_map.demo import make_tiny_pipeline
        >>> dmap = compile_device_map(make_tiny_pipeline(), "layerwise", device="cpu")
        >>> dmap["transformer.double_blocks.0"]
        <Placement.LAYER_WINDOW: 'layer-window'>
    """
    found = discover_components(pipeline)
    target = str(resolve_device(device, present=False))  # planning needs no device: a map may be for another machine
    return compile_found(found, collect_tensors(found), strategy, target, window, budget, compression)


def compile_found(
    found: PipelineModules,
    tensors: list[TensorRef],
    strategy: str,
    device: str,
    window: int,
    budget: int | None,
    compression: "str | dict[str, str] | None" = None,
) -> DeviceMap:
    """``compile_device_map`` on a pipeline already discovered (``found``, its ``tensors``) for a resolved device."""
    strategy = check_strategy(strategy)
    check_window(window)
    if strategy == "auto" and budget is None:
        key = budget_key(resolve_device(device, present=False))
        raise ValueError(f"strategy 'auto' needs a budget: pass max_memory={{{key!r}: '12GiB'}} or gpu_budget='12GiB'")
    whole = _sized(_place(found, "none", device, window, {}), tensors)
    whole.compression = check_compression(compression, whole.components)
    check_compressed_paths(whole.compression, found)
    sizes = _component_bytes(whole)
    if strategy == "none":
        return whole
    dmap = _sized(_place(found, "layerwise" if strategy == "auto" else strategy, device, window, sizes), tensors)
    dmap.strategy, dmap.compression = strategy, whole.compression
    if budget is None:
        return dmap
    if strategy == "auto" and fits_entirely(sum(sizes.values()), budget):
        whole.strategy = "auto"
        return whole
    _keep_encoders(dmap, budget)
    _fit_window(dmap, budget)
    _warn_pinned_over_budget(dmap, budget)
    return dmap


def _sized(dmap: DeviceMap, tensors: list[TensorRef]) -> DeviceMap:
    return dmap.sized(assign_tensors(dmap.placements(), tensors))


def _component_bytes(dmap: DeviceMap, placement: Placement | None = None) -> dict[str, int]:
    # Per component, the bytes of its entries (of one placement only, if given).
    out = dict.fromkeys(dmap.components, 0)
    for entry in dmap.entries.values():
        if placement is None or entry.placement is placement:
            out[owning_component(entry.path, dmap.components)] += entry.nbytes
    return out


def _streamed(dmap: DeviceMap) -> set[str]:
    # Components with blocks placed "layer-window".
    return {owning_component(e.path, dmap.components) for e in dmap.entries.values() if e.placement is Placement.LAYER_WINDOW}


def _moved_whole(dmap: DeviceMap) -> list[str]:
    # "cpu-pinned" components without streamed blocks: they move to the device whole.
    streamed = _streamed(dmap)
    return [n for n in dmap.components if dmap[n] is Placement.CPU_PINNED and n not in streamed]


def _keep_encoders(dmap: DeviceMap, budget: int) -> None:
    sizes = _component_bytes(dmap)
    on_device = _component_bytes(dmap, Placement.GPU)
    dits = [sizes[n] for n, role in dmap.components.items() if role is Role.DIT]
    held = max(dits, default=0) + sum(on_device[n] for n, role in dmap.components.items() if role is not Role.DIT)
    pinned = [n for n in _moved_whole(dmap) if dmap.components[n] is not Role.DIT]
    for name in sorted(pinned, key=lambda n: sizes[n]):
        if held + sizes[name] > (1 - ACTIVATION_SHARE) * budget:
            break
        dmap[name] = Placement.GPU
        held += sizes[name]


def _phase_bytes(dmap: DeviceMap, window: int, pinned: bool) -> dict[str, int]:
    """Component name -> device bytes while it runs: resident weights, the slots and pinned non-block weights of
    every streamed component on the device then (its own, and those its role does not exclude), and with ``pinned``
    the components moved whole that are loaded then (itself and those of a role it does not exclude: CLIP beside
    T5)."""
    resident = sum(e.nbytes for e in dmap.entries.values() if e.placement is Placement.GPU)
    blocks: dict[str, list[int]] = {}
    coded: set[str] = set()  # components with a coded block, which copy through staging buffers
    for entry in dmap.entries.values():
        if entry.placement is Placement.LAYER_WINDOW:
            name = owning_component(entry.path, dmap.components)
            blocks.setdefault(name, []).append(entry.nbytes)
            if dmap.compression_of(entry.path):
                coded.add(name)
    slots = {
        name: device_footprint(0, max(sizes), min(window, len(sizes)))
        + (staging_footprint(max(sizes)) if name in coded else 0)
        + (dmap.entries[name].nbytes if dmap[name] is Placement.CPU_PINNED else 0)
        for name, sizes in blocks.items()
    }
    whole = set(_moved_whole(dmap))
    out = {}
    for name, role in dmap.components.items():
        present = [other for other in dmap.components if other == name or not role.excludes(dmap.components[other])]
        out[name] = resident + sum(slots.get(other, 0) for other in present)
        if pinned:
            out[name] += sum(dmap.entries[other].nbytes for other in present if other in whole)
    return out


def _footprint(dmap: DeviceMap, window: int) -> int:
    return max(_phase_bytes(dmap, window, pinned=False).values(), default=0)


def _fit_window(dmap: DeviceMap, budget: int) -> None:
    if _footprint(dmap, 1) > budget:
        raise BudgetTooSmall(budget, _footprint(dmap, 1))
    while dmap.window > 1 and _footprint(dmap, dmap.window) > budget:
        dmap.window -= 1


def _warn_pinned_over_budget(dmap: DeviceMap, budget: int) -> None:
    # Components of one role (CLIP and T5) are on the device together; a streamed DiT's slots leave for them.
    sizes = _component_bytes(dmap)
    whole = _moved_whole(dmap)
    warned: set[Role] = set()
    for name, peak in _phase_bytes(dmap, dmap.window, pinned=True).items():
        role = dmap.components[name]
        if name not in whole or role is Role.DIT or role in warned or peak <= budget:
            continue
        warned.add(role)
        names = [n for n in whole if dmap.components[n] is role]
        logger.warning(
            "%s (%s, cpu-pinned) will hold %s of device memory while %s, above the budget of %s: "
            "give at least %s, or run %s elsewhere",
            ", ".join(names),
            human_bytes(sum(sizes[n] for n in names)),
            human_bytes(peak),
            "they run" if len(names) > 1 else "it runs",
            human_bytes(budget),
            human_bytes(peak),
            "them" if len(names) > 1 else "it",
        )


def _streams(comp, sizes: dict[str, int]) -> bool:
    # Under "layerwise": every DiT (an error below if it has no blocks), and big components with blocks.
    return comp.role is Role.DIT or (sizes[comp.name] >= STREAM_MIN_BYTES and bool(comp.blocks()))


def _tensor_ids(module, skip: tuple[str, ...] = ()) -> set[int]:
    # Every parameter and buffer reachable in ``module`` (a module registered twice too), except under ``skip``.
    out = set()
    for path, sub in module.named_modules(remove_duplicate=False):
        if not any(within(path, s) for s in skip):
            out.update(id(t) for t in [*sub._parameters.values(), *sub._buffers.values()] if t is not None)
    return out


def _shares_weights(comp, blocks: list[str], found: PipelineModules) -> bool:
    # Whether a tensor of ``comp`` outside its ``blocks`` (paths from the pipeline) is also held inside one of them or
    # by another component: tied weights, or one module registered in two places.
    rel = tuple(path[len(comp.name) + 1 :] if comp.name else path for path in blocks)
    rest = _tensor_ids(comp.module, skip=rel)
    elsewhere = set().union(
        *(_tensor_ids(comp.module.get_submodule(path)) for path in rel),
        *(_tensor_ids(other.module) for other in found.components.values() if other is not comp),
    )
    return bool(rest & elsewhere)


def _place(found: PipelineModules, strategy: str, device: str, window: int, sizes: dict[str, int]) -> DeviceMap:
    dmap = DeviceMap(device, {c.name: c.role for c in found.components.values()}, window=window, strategy=strategy)
    for comp in found.components.values():
        offloaded = strategy != "none" and comp.role is not Role.OTHER and not comp.resident
        if strategy == "layerwise" and offloaded and _streams(comp, sizes):
            blocks = comp.blocks()
            if not blocks:
                raise ValueError(
                    f"{type(comp.module).__name__} ({comp.name or 'the pipeline'}) has no block lists to stream. Declare "
                    f"them on the class, e.g. {type(comp.module).__name__}._layerwise_offload_blocks_attrs = ['blocks'] "
                    "(registered nn.ModuleList attributes, in execution order), or use strategy='model'"
                )
            paths = [path for path, _ in blocks]
            # Pinned, its non-block weights leave while the components it excludes run; with none, they would only
            # arrive later than resident ones.
            turns = any(other is not comp and comp.role.excludes(other.role) for other in found.components.values())
            travels = turns and not _shares_weights(comp, paths, found)
            dmap[comp.name] = Placement.CPU_PINNED if travels else Placement.GPU
            for path in paths:
                dmap[path] = Placement.LAYER_WINDOW
        else:
            dmap[comp.name] = Placement.CPU_PINNED if offloaded else Placement.GPU
    return dmap
