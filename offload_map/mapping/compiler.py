"""Compiling a pipeline into a device map for a named strategy.

Strategies:

- ``"none"``: every component resident (``"gpu"``).
- ``"model"``: DiTs, encoders and VAEs ``"cpu-pinned"``, taking turns on the device (a DiT excludes the
  encoders, the VAEs and every other DiT); other components and ``_resident_modules`` stay ``"gpu"``.
- ``"layerwise"``: as ``"model"``, except each DiT is ``"gpu"`` with its blocks ``"layer-window"``,
  streamed through ``window`` slots.
- ``"auto"`` (needs a budget): everything ``"gpu"`` if the whole pipeline fits the budget, else as
  ``"layerwise"``; the blocks to keep resident are chosen after the second forward (``offload_map.auto``).

With a budget (``"auto"`` or ``"layerwise"``), encoders and VAEs are placed one by one: smallest first,
each stays ``"gpu"`` while it fits beside the largest DiT held entirely resident (a resident encoder saves a
load per prompt, a resident block saves a copy per step, so blocks come first); the rest are
``"cpu-pinned"``. The window then shrinks (down to 1) until the resident weights and the slots fit. A
pinned component too large to run within the budget beside what stays resident is reported with a
warning (it still runs; streaming encoders is not supported).
"""

from __future__ import annotations

import logging

from ..collect.components import ModuleDiscovery, PipelineModules, Role
from ..collect.tensors import TensorRef, collect_tensors
from .device_map import DeviceMap, check_window
from .devices import resolve_device
from .memory import ACTIVATION_SHARE, BudgetTooSmall, device_footprint, fits_entirely
from .ownership import assign_tensors, owning_component
from .placement import Placement
from .sizes import human_bytes

logger = logging.getLogger("offload_map")

STRATEGIES = ("none", "model", "layerwise", "auto")


def check_strategy(strategy: object) -> str:
    """Return the strategy name for ``strategy`` (a name or an ``OffloadStrategy``), or raise a ValueError."""
    name = getattr(strategy, "value", strategy)
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(map(repr, STRATEGIES))}")
    return name


def compile_device_map(pipeline: object, strategy: str = "model", device=None, window: int = 2, budget: int | None = None) -> DeviceMap:
    """Compile ``pipeline`` into a ``DeviceMap`` for ``strategy`` (see the module docstring).

    Args:
        pipeline: a diffusers pipeline, an object holding ``nn.Module``s, or an ``nn.Module``.
        strategy: ``"none"``, ``"model"``, ``"layerwise"`` or ``"auto"`` (with a budget).
        device: target device; ``None`` picks this rank's GPU, or the CPU without one.
        window: device slots per streamed DiT (``"layerwise"``); more than the blocks means all resident.
        budget: device bytes the map may use (``"auto"``, ``"layerwise"``), e.g. from ``sizes.parse_size``.

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
    found = ModuleDiscovery.discover(pipeline)
    return compile_found(found, collect_tensors(found), strategy, str(resolve_device(device)), window, budget)


def compile_found(found: PipelineModules, tensors: list[TensorRef], strategy: str, device: str, window: int,
                  budget: int | None) -> DeviceMap:
    """``compile_device_map`` on a pipeline already discovered (``found``, its ``tensors``) for a resolved device."""
    strategy = check_strategy(strategy)
    check_window(window)
    if strategy == "auto" and budget is None:
        raise ValueError("strategy 'auto' needs a budget: pass max_memory={0: '12GiB'} or gpu_budget='12GiB'")
    dmap = _sized(_place(found, "layerwise" if strategy == "auto" else strategy, device, window), tensors)
    dmap.strategy = strategy
    if budget is None:
        return dmap
    if strategy == "auto" and fits_entirely(sum(dmap.bytes_by_placement().values()), budget):
        dmap = _sized(_place(found, "none", device, window), tensors)
        dmap.strategy = "auto"
        return dmap
    _keep_encoders(dmap, budget)
    _fit_window(dmap, budget)
    _warn_pinned_over_budget(dmap, budget)
    return dmap


def _sized(dmap: DeviceMap, tensors: list[TensorRef]) -> DeviceMap:
    return dmap.sized(assign_tensors(dmap.placements(), tensors))


def _component_bytes(dmap: DeviceMap) -> dict[str, int]:
    out = dict.fromkeys(dmap.components, 0)
    for entry in dmap.entries.values():
        out[owning_component(entry.path, dmap.components)] += entry.nbytes
    return out


def _keep_encoders(dmap: DeviceMap, budget: int) -> None:
    sizes = _component_bytes(dmap)
    dits = [sizes[n] for n, role in dmap.components.items() if role is Role.DIT]
    held = max(dits, default=0) + sum(
        sizes[n] for n, role in dmap.components.items() if role is not Role.DIT and dmap[n] is Placement.GPU
    )
    pinned = [n for n in dmap.components if dmap[n] is Placement.CPU_PINNED and dmap.components[n] is not Role.DIT]
    for name in sorted(pinned, key=lambda n: sizes[n]):
        if held + sizes[name] > (1 - ACTIVATION_SHARE) * budget:
            break
        dmap[name] = Placement.GPU
        held += sizes[name]


def _footprint(dmap: DeviceMap, window: int) -> int:
    # Resident weights plus, for every streamed DiT, its slots sized for its largest block.
    resident = sum(e.nbytes for e in dmap.entries.values() if e.placement is Placement.GPU)
    blocks: dict[str, list[int]] = {}
    for entry in dmap.entries.values():
        if entry.placement is Placement.LAYER_WINDOW:
            blocks.setdefault(owning_component(entry.path, dmap.components), []).append(entry.nbytes)
    return resident + sum(device_footprint(0, max(sizes), min(window, len(sizes))) for sizes in blocks.values())


def _fit_window(dmap: DeviceMap, budget: int) -> None:
    if _footprint(dmap, 1) > budget:
        raise BudgetTooSmall(budget, _footprint(dmap, 1))
    while dmap.window > 1 and _footprint(dmap, dmap.window) > budget:
        dmap.window -= 1


def _warn_pinned_over_budget(dmap: DeviceMap, budget: int) -> None:
    # While pinned components run, a DiT's resident blocks leave but its non-block weights and slots stay;
    # components of one role (CLIP and T5) are on the device together.
    floor = _footprint(dmap, dmap.window)
    together: dict[Role, list[str]] = {}
    for name, role in dmap.components.items():
        if dmap[name] is Placement.CPU_PINNED and role is not Role.DIT:
            together.setdefault(role, []).append(name)
    sizes = _component_bytes(dmap)
    for role, names in together.items():
        peak = floor + sum(sizes[n] for n in names)
        if peak > budget:
            logger.warning(
                "%s (%s, cpu-pinned) will hold %s of device memory while %s, above the budget of %s: "
                "give at least %s, or run %s elsewhere", ", ".join(names), human_bytes(sum(sizes[n] for n in names)),
                human_bytes(peak), "they run" if len(names) > 1 else "it runs", human_bytes(budget), human_bytes(peak),
                "them" if len(names) > 1 else "it",
            )


def _place(found: PipelineModules, strategy: str, device: str, window: int) -> DeviceMap:
    dmap = DeviceMap(device, {c.name: c.role for c in found.components.values()}, window=window, strategy=strategy)
    for comp in found.components.values():
        offloaded = strategy != "none" and comp.role is not Role.OTHER and not comp.resident
        if strategy == "layerwise" and comp.role is Role.DIT and offloaded:
            blocks = comp.blocks()
            if not blocks:
                raise ValueError(
                    f"{type(comp.module).__name__} ({comp.name or 'the pipeline'}) has no block lists to stream. Declare "
                    f"them on the class, e.g. {type(comp.module).__name__}._layerwise_offload_blocks_attrs = ['blocks'] "
                    "(registered nn.ModuleList attributes, in execution order), or use strategy='model'"
                )
            dmap[comp.name] = Placement.GPU
            for path, _ in blocks:
                dmap[path] = Placement.LAYER_WINDOW
        else:
            dmap[comp.name] = Placement.CPU_PINNED if offloaded else Placement.GPU
    return dmap
