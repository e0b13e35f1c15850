"""Budgets: fit a pipeline into a device memory budget, re-planned after its DiT's second forward.

Used by ``dispatch_pipeline`` when a budget is given (``max_memory``/``gpu_budget``), with strategy
``"auto"`` or ``"layerwise"``. The compiler has placed the encoders and VAEs and left every block streamed
(``mapping.compiler``). ``AutoPlanner`` arms the runtime's calibration of each streamed DiT: its second
forward is timed block by block (the first pays for lazy CUDA initialisation). From those measurements and
the lower of the probed bandwidth and the one its copies achieved beside compute, the planner
(``planning.planner.plan_blocks``) returns an immutable ``BlockPlan``: which blocks stay resident, which keep
their largest submodules on the device, and the window. The runtime applies it at that forward boundary
(``Runtime.set_residency``), and the handle's ``device_map`` becomes a new map that records it; the map the
user passed or read before is never changed.

This module holds the policy; the runtime only carries it out.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from .mapping.device_map import DeviceMap, MapEntry
from .mapping.memory import BudgetTooSmall
from .mapping.placement import Placement
from .mapping.sizes import human_bytes
from .planning.bind import ExecutionPlan, Unit, direct_child
from .planning.cost_model import ModelCost
from .planning.planner import BlockPlan, plan_blocks
from .runtime.host_buffer import layout
from .runtime.runtime import Runtime

logger = logging.getLogger("offload_map")


class AutoPlanner:
    """Re-plans each streamed DiT of ``runtime`` after its second forward, within ``budget`` bytes.

    Attributes:
        plans: component name -> the ``BlockPlan`` in force (after calibration).
        device_map: the map in force: ``device_map`` as given until a plan is applied, then a new map recording it.
    """

    def __init__(self, runtime: Runtime, plan: ExecutionPlan, device_map: DeviceMap, budget: int, bandwidth: float) -> None:
        self.runtime = runtime
        self.execution = plan
        self.device_map = device_map
        self.budget = budget
        self.bandwidth = bandwidth
        self.plans: dict[str, BlockPlan] = {}
        self.resident = sum(u.nbytes for u in plan.resident)  # every DiT's non-block weights and the rest
        for ring in plan.rings:
            own = sum(u.nbytes for u in plan.resident if plan.component_of(u.path).name == ring.component)
            runtime.arm_calibration(ring.component, lambda cost, name=ring.component, own=own: self.replan(name, cost, own))

    def replan(self, name: str, cost: ModelCost, own: int) -> None:
        """Choose resident blocks, kept parts and the window for DiT ``name`` from its measured ``cost``; apply them."""
        dit_budget = self.budget - (self.resident - own)
        cost = self.runtime.agree(cost)  # one plan for all ranks that load blocks together, or their loads diverge
        # Copies beside compute run slower than the idle probe measured: plan with what they achieved. Sharded
        # loads (1/N per rank, then an all-gather) may beat the one link the probe measured: theirs alone count.
        measured = cost.copy_bandwidth
        if measured is None:
            bandwidth = self.bandwidth
        else:
            bandwidth = measured if self.runtime.sharded else min(self.bandwidth, measured)
        try:
            plan = plan_blocks(cost, dit_budget, bandwidth)
        except BudgetTooSmall as err:
            logger.warning("%s: %s; measured activations need %s. Keeping every block streamed.",
                           name or "DiT", err, human_bytes(cost.activation_bytes))
            return
        kept = {cost.blocks[i].path: cost.blocks[i].nbytes for i in plan.resident}
        kept.update((cost.blocks[i].path, size) for i, size in plan.kept.items())
        try:
            self.runtime.set_residency(name, kept, plan.window)
        except torch.OutOfMemoryError as err:
            logger.warning("%s: %s. Streaming every block through one slot instead.", name or "DiT", err)
            return
        self.plans[name] = plan
        ring = next(r for r in self.execution.rings if r.component == name)
        self.device_map = _recorded(self.device_map, ring.blocks, kept, plan.window)
        logger.info("%s: %d of %d blocks resident, %d in part, window %d, predicted step %.1f ms within %s", name or "DiT",
                    len(plan.resident), len(ring.blocks), len(plan.kept), plan.window, plan.step_s * 1e3, human_bytes(dit_budget))


def _recorded(dmap: DeviceMap, blocks: list[Unit], kept: dict[str, int], window: int) -> DeviceMap:
    """A new map: ``dmap`` with ``blocks`` placed as planned. A block kept whole is ``"gpu"``; a block streamed in part
    is the ``"layer-window"`` block with its kept submodules nested right after it as ``"gpu"`` entries, so a map saved
    from here and dispatched again keeps the same bytes on the device. Entries already nested in a block (a map
    written by an earlier plan, re-dispatched by ``refresh()``) are units of their own, outside the block: they stay."""
    planned: dict[str, list[MapEntry]] = {}
    for block in blocks:
        regions, total = layout([ref.tensor for ref in block.tensors])
        size = kept.get(block.path, 0)
        if size and size >= total:
            planned[block.path] = [replace(dmap.entries[block.path], placement=Placement.GPU)]
            continue
        children: dict[str, int] = {}
        for ref, region in zip(block.tensors, regions):
            if region.offset < size:  # a kept prefix holds whole submodules (``runtime.host_buffer.split_points``)
                child = f"{block.path}.{direct_child(ref.qualname, block.path)}"
                children[child] = children.get(child, 0) + ref.nbytes
        entry = dmap.entries[block.path]
        planned[block.path] = [replace(entry, placement=Placement.LAYER_WINDOW, nbytes=block.nbytes - sum(children.values())),
                               *(MapEntry(child, Placement.GPU, n, entry.dtype) for child, n in children.items())]
    out = dmap.copy()
    out.window = window
    out.entries = {}
    for path, entry in dmap.entries.items():
        for new in planned.get(path, [entry]):
            out.entries[new.path] = new
    return out
