"""Budgets: fit a pipeline into a device memory budget, re-planned after its DiT's second forward.

Used by ``dispatch_pipeline`` when a budget is given (``max_memory``/``gpu_budget``), with strategy
``"auto"`` or ``"layerwise"``. If the whole pipeline fits the budget with ``ACTIVATION_SHARE`` of it left
for activations, ``"auto"`` keeps everything resident (``"gpu"``) and says so. Otherwise the encoders and
VAEs that do not fit beside the DiT are ``"cpu-pinned"`` (``compiler``) and each DiT starts with every
block streamed; its second forward is timed block by block (``calibration.BlockTimer``; the first pays for
lazy CUDA initialisation), and from those measurements and the lower of the probed bandwidth and the one
its copies achieved beside compute, the planner (``planner.plan_blocks``) picks the resident blocks and the window, which the runtime applies between that
forward and the next. ``AutoPlanner`` holds this policy; the runtime only carries it out.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from .calibration import BlockTimer
from .cost_model import ModelCost
from .device_map import DeviceMap, MapEntry, human_bytes
from .placement import Placement
from .plan import ExecutionPlan, direct_child
from .planner import BlockPlan, BudgetTooSmall, plan_blocks
from .runtime import Runtime
from .sharded_copy import ShardedCopy

logger = logging.getLogger("offload_map")

# Share of the budget kept free for activations when deciding that the whole pipeline fits.
ACTIVATION_SHARE = 0.1


def fits_entirely(total_bytes: int, budget: int) -> bool:
    """Whether the whole pipeline can stay resident within ``budget``."""
    return total_bytes <= (1 - ACTIVATION_SHARE) * budget


class AutoPlanner:
    """Re-plans each streamed DiT of ``runtime`` after its second forward, within ``budget`` bytes.

    Attributes:
        plans: component name -> the ``BlockPlan`` in force (after calibration).
    """

    def __init__(self, runtime: Runtime, plan: ExecutionPlan, device_map: DeviceMap, budget: int, bandwidth: float) -> None:
        self.runtime = runtime
        self.device_map = device_map
        self.budget = budget
        self.bandwidth = bandwidth
        self.plans: dict[str, BlockPlan] = {}
        self.resident = sum(u.nbytes for u in plan.resident)  # every DiT's non-block weights and the rest
        for ring in plan.rings:
            own = sum(u.nbytes for u in plan.resident if plan.component_of(u.path).name == ring.component)
            slot_ring = runtime.rings[ring.component]
            runtime.prefetchers[ring.component].timer = BlockTimer(
                runtime.ordering, slot_ring.paths, [b.nbytes for b in slot_ring.blocks],
                [b.split_points(path) for b, path in zip(slot_ring.blocks, slot_ring.paths)], own,
                lambda cost, name=ring.component, own=own: self.replan(name, cost, own),
            )

    def replan(self, name: str, cost: ModelCost, own: int) -> None:
        """Choose resident blocks and the window for DiT ``name`` from its measured ``cost``, and apply them."""
        dit_budget = self.budget - (self.resident - own)
        sharded = isinstance(self.runtime.copier, ShardedCopy)
        if sharded:
            cost = self.runtime.copier.agree(cost)  # one plan for all ranks, or their loads would diverge
        # Copies beside compute run slower than the idle probe measured: plan with what they achieved. Sharded
        # loads (1/N per rank, then an all-gather) may beat the one link the probe measured: theirs alone count.
        measured = cost.copy_bandwidth
        if measured is None:
            bandwidth = self.bandwidth
        else:
            bandwidth = measured if sharded else min(self.bandwidth, measured)
        try:
            plan = plan_blocks(cost, dit_budget, bandwidth)
        except BudgetTooSmall as err:
            logger.warning("%s: %s; measured activations need %s. Keeping every block streamed.",
                           name or "DiT", err, human_bytes(cost.activation_bytes))
            return
        ring = self.runtime.rings[name]
        by_path = {path: index for index, path in enumerate(ring.paths)}
        resident = frozenset(by_path[cost.blocks[i].path] for i in plan.resident)
        kept = {by_path[cost.blocks[i].path]: size for i, size in plan.kept.items()}
        try:
            self.runtime.set_residency(name, resident, plan.window, kept)
        except torch.OutOfMemoryError as err:
            logger.warning("%s: %s. Streaming every block through one slot instead.", name or "DiT", err)
            return
        self.plans[name] = plan
        for index, path in enumerate(ring.paths):
            self._place(path, ring.blocks[index], Placement.GPU if index in resident else Placement.LAYER_WINDOW, kept.get(index, 0))
        self.device_map.window = plan.window
        logger.info("%s: %d of %d blocks resident, %d in part, window %d, predicted step %.1f ms within %s", name or "DiT",
                    len(resident), len(ring.paths), len(kept), plan.window, plan.step_s * 1e3, human_bytes(dit_budget))

    def _place(self, path: str, storage, placement: Placement, kept: int) -> None:
        # A block streamed in part is written as the block ("layer-window") with its kept submodules nested
        # right after it as "gpu" entries: a map saved from here and dispatched again keeps the same bytes on
        # the device. Entries already nested in the block (a map written by an earlier plan, re-dispatched by
        # refresh()) are units of their own, outside ``storage``: they stay.
        children: dict[str, int] = {}
        total = 0
        for ref, region in zip(storage.refs, storage.regions):
            nbytes = ref.tensor.numel() * ref.tensor.element_size()
            total += nbytes
            if region.offset < kept:
                child = f"{path}.{direct_child(ref.qualname, path)}"  # a kept prefix holds whole submodules
                children[child] = children.get(child, 0) + nbytes
        entries = {}
        for key, entry in self.device_map.entries.items():
            if key == path:
                entry = replace(entry, placement=placement, nbytes=total - sum(children.values()))
            entries[key] = entry
            if key == path:
                entries.update((child, MapEntry(child, Placement.GPU, n, entry.dtype)) for child, n in children.items())
        self.device_map.entries = entries
