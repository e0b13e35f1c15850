"""Compiling a pipeline into a device map for a named strategy.

Strategies:

- ``"none"``: every component resident (``"gpu"``).
- ``"model"``: DiTs, encoders and VAEs ``"cpu-pinned"``, taking turns on the device (a DiT excludes the
  encoders, the VAEs and every other DiT); other components and ``_resident_modules`` stay ``"gpu"``.
- ``"layerwise"``: as ``"model"``, except each DiT is ``"gpu"`` with its blocks ``"layer-window"``,
  streamed through ``window`` slots.
- ``"auto"`` (needs a budget): everything ``"gpu"`` if the whole pipeline fits the budget, else as
  ``"layerwise"``; the blocks to keep resident are chosen after the second forward (``auto.AutoPlanner``).

With a budget (``"auto"`` or ``"layerwise"``), encoders and VAEs are placed one by one: smallest first,
each stays ``"gpu"`` while it fits beside the largest DiT held entirely resident (a resident encoder saves a
load per prompt, a resident block saves a copy per step, so blocks come first); the rest are
``"cpu-pinned"``. The window then shrinks (down to 1) until the resident weights and the slots fit. A
pinned component too large to run within the budget beside what stays resident is reported with a
warning (it still runs; streaming encoders is not supported).
"""

from __future__ import annotations

import logging

from .auto import ACTIVATION_SHARE, fits_entirely
from .blocks import get_blocks
from .devices import resolve_device
from .device_map import DeviceMap, MapEntry, check_window, human_bytes, owning_component
from .module_collector import ModuleDiscovery
from .placement import Placement, Role
from .plan import bind
from .planner import BudgetTooSmall

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
        strategy: ``"none"``, ``"model"`` or ``"layerwise"``.
        device: target device; ``None`` picks this rank's GPU, or the CPU without one.
        window: device slots per streamed DiT (``"layerwise"``); more than the blocks means all resident.
        budget: device bytes the map may use (``"auto"``, ``"layerwise"``), e.g. from ``budget.parse_size``.

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
    strategy = check_strategy(strategy)
    check_window(window)
    if strategy == "auto" and budget is None:
        raise ValueError("strategy 'auto' needs a budget: pass max_memory={0: '12GiB'} or gpu_budget='12GiB'")
    dev = resolve_device(device)
    found = ModuleDiscovery.discover(pipeline)
    dmap = _place(found, strategy if strategy != "auto" else "layerwise", str(dev), window)
    dmap.strategy = strategy
    dmap = with_sizes(dmap, pipeline)
    if budget is None:
        return dmap
    if strategy == "auto" and fits_entirely(sum(dmap.bytes_by_placement().values()), budget):
        dmap = with_sizes(_place(found, "none", str(dev), window), pipeline)
        dmap.strategy = "auto"
        return dmap
    _keep_encoders(dmap, budget)
    plan = bind(dmap, pipeline)  # placements are final here; only the window changes below
    dmap = _fit_window(dmap, plan, budget)
    _warn_pinned_over_budget(dmap, plan, budget)
    return dmap


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


def _fit_window(dmap: DeviceMap, plan, budget: int) -> DeviceMap:
    resident = sum(u.nbytes for u in plan.resident)
    largest = max((u.nbytes for ring in plan.rings for u in ring.blocks), default=0)
    if resident + largest > budget:
        raise BudgetTooSmall(budget, resident + largest)
    while dmap.window > 1 and resident + dmap.window * largest > budget:
        dmap.window -= 1
    return dmap


def _warn_pinned_over_budget(dmap: DeviceMap, plan, budget: int) -> None:
    # While pinned components run, a DiT's resident blocks leave but its non-block weights and slots stay;
    # components of one role (CLIP and T5) are on the device together.
    floor = sum(u.nbytes for u in plan.resident) + sum(min(dmap.window, len(r.blocks)) * max(u.nbytes for u in r.blocks)
                                                      for r in plan.rings)
    together: dict[Role, list[str]] = {}
    for comp in plan.components:
        if comp.placement is Placement.CPU_PINNED and comp.role is not Role.DIT:
            together.setdefault(comp.role, []).append(comp.name)
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


def _place(found, strategy: str, device: str, window: int) -> DeviceMap:
    dmap = DeviceMap(device, {c.name: c.role for c in found.components.values()}, window=window, strategy=strategy)
    for comp in found.components.values():
        offloaded = strategy != "none" and comp.role is not Role.OTHER and not comp.resident
        if strategy == "layerwise" and comp.role is Role.DIT and offloaded:
            blocks = get_blocks(comp.module)
            if not blocks:
                raise ValueError(
                    f"{type(comp.module).__name__} ({comp.name or 'the pipeline'}) has no block lists to stream. Declare "
                    f"them on the class, e.g. {type(comp.module).__name__}._layerwise_offload_blocks_attrs = ['blocks'] "
                    "(registered nn.ModuleList attributes, in execution order), or use strategy='model'"
                )
            dmap[comp.name] = Placement.GPU
            for path, _ in blocks:
                dmap[f"{comp.name}.{path}".lstrip(".")] = Placement.LAYER_WINDOW
        else:
            dmap[comp.name] = Placement.CPU_PINNED if offloaded else Placement.GPU
    return dmap


def with_sizes(dmap: DeviceMap, pipeline: object) -> DeviceMap:
    """``dmap`` with every entry's bytes and dtype read from ``pipeline`` (validates the map on the way)."""
    plan = bind(dmap, pipeline)
    for path, unit in plan.units.items():
        dtypes = sorted({str(t.tensor.dtype).removeprefix("torch.") for t in unit.tensors})
        dmap.entries[path] = MapEntry(path, unit.placement, unit.nbytes, "+".join(dtypes))
    return dmap
