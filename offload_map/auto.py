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

A streamed DiT's kept blocks leave the device while the components it excludes run (encoders, the VAE), and
come back for the next call: a copy of everything kept, once per call (its pinned weights outside the blocks
leave and come back too, whatever the plan). With a budget the planner weighs that
against keeping them there: it also plans the DiT within the budget less a reserve for those components'
phases (their slots or whole size, and ``ACTIVATION_SHARE`` of the budget for activations) and keeps the plan
whose call is predicted faster, weighting the DiT's step by how often it runs in one call: as ``runs_per_call``
says, else as counted in the first call (``Runtime.watch_calls``; until then ``DEFAULT_DIT_RUNS``), choosing
again once it is counted. Every streamed component is planned within what is left beside what the others
hold while it runs (the DiT's kept blocks if they stay; all of an encoder that runs beside it), and planned
again when a later plan leaves its phase over the budget.

This module holds the policy; the runtime only carries it out.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from .collect.components import Role
from .mapping.device_map import DeviceMap, MapEntry
from .mapping.memory import ACTIVATION_SHARE, BudgetTooSmall
from .mapping.ownership import within
from .mapping.placement import Placement
from .mapping.sizes import human_bytes
from .planning.bind import ExecutionPlan, Unit, direct_child
from .planning.cost_model import ModelCost
from .planning.planner import BlockPlan, plan_blocks
from .runtime.host_buffer import layout
from .runtime.runtime import Runtime

logger = logging.getLogger("offload_map")

# How often a DiT runs in one call unless ``runs_per_call`` says otherwise: diffusers' default steps for Flux.
DEFAULT_DIT_RUNS = 28


class AutoPlanner:
    """Re-plans each streamed component of ``runtime`` after its second forward, within ``budget`` bytes.

    Args:
        runs_per_call: component name -> how often it runs in one call of the pipeline (default: each DiT
            ``DEFAULT_DIT_RUNS`` times, every other component once).

    Attributes:
        plans: component name -> the ``BlockPlan`` in force (after calibration).
        stays: component name -> whether its kept blocks stay on the device while the components it excludes run.
        device_map: the map in force: ``device_map`` as given until a plan is applied, then a new map recording it.
    """

    def __init__(
        self,
        runtime: Runtime,
        plan: ExecutionPlan,
        device_map: DeviceMap,
        budget: int,
        bandwidth: float,
        runs_per_call: dict[str, int] | None = None,
    ) -> None:
        self.runtime = runtime
        self.execution = plan
        self.device_map = device_map
        self.budget = budget
        self.bandwidth = bandwidth
        self.roles = {c.name: c.role for c in plan.components}
        self.given = dict(runs_per_call or {})
        self.runs = {name: self.given.get(name, DEFAULT_DIT_RUNS if role is Role.DIT else 1) for name, role in self.roles.items()}
        self.learned = False
        self.options: dict[str, list] = {}  # component -> its candidate plans, to choose again once runs are counted
        self.plans: dict[str, BlockPlan] = {}
        self.stays: dict[str, bool] = {}
        self.kept_bytes: dict[str, int] = {}
        self.costs: dict[str, tuple[ModelCost, int]] = {}  # component -> its measured cost and resident bytes, to plan again
        self.staged: dict[str, int] = {}  # component -> its staging buffers' bytes when it was last planned
        # Coded components -> their step predicted if they streamed raw (``compression``), warned about once if faster.
        self.raw_steps: dict[str, float | None] = {}
        self.warned_raw: set[str] = set()
        self._refitting = False
        self.resident = sum(u.nbytes for u in plan.resident)  # on the device throughout
        # Components moved whole, and streamed components' pinned weights outside their blocks.
        # As the host buffers lay them out (tensors aligned), which is what a load allocates on the device.
        self.pinned = {plan.component_of(u.path).name: runtime.host.units[u.path].nbytes for u in plan.pinned}
        # A streamed component's slots (and staging buffers) as dispatched (every block streamed), until its plan is made.
        self.slots = {name: ring.device_bytes for name, ring in runtime.rings.items()}
        for ring in plan.rings:
            own = sum(u.nbytes for u in plan.resident if plan.component_of(u.path).name == ring.component)
            runtime.arm_calibration(ring.component, lambda cost, name=ring.component, own=own: self.replan(name, cost, own))
        runtime.watch_calls(self.learn)

    def learn(self, counts: dict[str, int]) -> None:
        """The first call ended: weigh each component by how often it ran (where ``runs_per_call`` did not say) and
        choose again between the plans made so far."""
        if self.learned:
            return
        self.learned = True
        self.runs.update((name, runs) for name, runs in counts.items() if name not in self.given)
        for name in list(self.options):
            self._choose(name)

    def replan(self, name: str, cost: ModelCost, own: int) -> None:
        """Choose resident blocks, kept parts, the window and whether they stay for component ``name`` from its measured
        ``cost`` (``own``: its resident bytes outside the blocks); apply them."""
        # One plan for all ranks that load blocks together, or their loads diverge.
        self.costs[name] = (self.runtime.agree(cost), own)
        self._plan(name)

    def restage(self) -> None:
        """After ``refresh()`` coded blocks anew: plan again each measured component whose staging buffers changed
        size with its codes (``compression``), so that its plan and its staging buffers fit the budget together."""
        for name in list(self.costs):
            if self._staging(name) != self.staged.get(name):
                self._plan(name)

    def _plan(self, name: str) -> None:
        cost, own = self.costs[name]
        self.staged[name] = self._staging(name)
        budget = self._budget(name)
        # Copies beside compute run slower than the idle probe measured: plan with what they achieved. Sharded
        # loads (1/N per rank, then an all-gather) may beat the one link the probe measured: theirs alone count.
        measured = cost.copy_bandwidth
        # Coded blocks (``compression``) cross the link in fewer bytes: plans count raw bytes, so at a higher rate.
        probed = self.bandwidth / self.runtime.rings[name].wire_ratio
        if measured is None:
            bandwidth = probed
        else:
            bandwidth = measured if self.runtime.sharded else min(probed, measured)
        try:
            options = [(plan_blocks(cost, budget, bandwidth), False)]
        except BudgetTooSmall as err:
            logger.warning(
                "%s: %s; measured activations need %s. Keeping every block streamed.",
                name or "DiT",
                err,
                human_bytes(cost.activation_bytes),
            )
            window = self._ring(name).window
            if name not in self.plans or self._apply(name, {}, window, False):
                self._forget(name, window)
            return
        if self._may_stay(name):
            try:
                options.append((plan_blocks(cost, budget - self._reserve(name), bandwidth), True))
            except BudgetTooSmall:
                pass
        self.options[name] = options
        self.raw_steps[name] = self._raw_step(name, cost, budget, bandwidth)
        self._choose(name)

    def _raw_step(self, name: str, cost: ModelCost, budget: int, bandwidth: float) -> float | None:
        """For a component whose blocks are coded: the step predicted if they streamed as they are, the staging
        buffers' room given to the plan (None where none is coded, or that plan does not fit either)."""
        share = self.runtime.rings[name].wire_ratio
        if share >= 1:
            return None
        try:
            return plan_blocks(cost, budget + self._staging(name), bandwidth * share).step_s
        except BudgetTooSmall:
            return None

    def _choose(self, name: str) -> None:
        # The option predicted fastest for a call as now weighed; applied if it is not the one in force.
        plan, stays = min(self.options[name], key=lambda option: self._seconds(name, *option))
        if self.plans.get(name) is plan:
            return
        cost = plan.cost
        kept = {cost.blocks[i].path: cost.blocks[i].nbytes for i in plan.resident}
        kept.update((cost.blocks[i].path, size) for i, size in plan.kept.items())
        if not self._apply(name, kept, plan.window, stays):
            return
        self.plans[name], self.stays[name], self.kept_bytes[name] = plan, stays, sum(kept.values())
        ring = self._ring(name)
        self.device_map = _recorded(self.device_map, ring.blocks, kept, plan.window)
        raw = self.raw_steps.get(name)
        if raw is not None and raw < plan.step_s and name not in self.warned_raw:
            self.warned_raw.add(name)
            logger.warning(
                "%s: at this budget its coded blocks are predicted slower than raw ones: %.1f ms a step against %.1f ms "
                "streaming them as they are (their staging buffers take %s of the budget). Give a larger budget, or "
                "leave this component out of compression",
                name or "DiT",
                plan.step_s * 1e3,
                raw * 1e3,
                human_bytes(self._staging(name)),
            )
        logger.info(
            "%s: %d of %d blocks resident, %d in part, window %d%s, predicted step %.1f ms, %.2f s per call of %d runs",
            name or "DiT",
            len(plan.resident),
            len(ring.blocks),
            len(plan.kept),
            plan.window,
            ", kept blocks stay" if stays else "",
            plan.step_s * 1e3,
            self._seconds(name, plan, stays),
            self.runs[name],
        )
        self._refit(name)

    def _apply(self, name: str, kept: dict[str, int], window: int, stays: bool) -> bool:
        """Have the runtime keep ``kept`` of component ``name``; False if the device ran out of memory (the runtime then
        streams every block through one slot, and so does the record here)."""
        try:
            self.runtime.set_residency(name, kept, window, stays)
        except torch.OutOfMemoryError as err:
            logger.warning("%s: %s. Streaming every block through one slot instead.", name or "DiT", err)
            self._forget(name, 1)
            return False
        return True

    def _forget(self, name: str, window: int) -> None:
        """No plan in force for component ``name``: every block streams through ``window`` slots."""
        had = name in self.plans
        for state in (self.options, self.plans, self.stays, self.kept_bytes):
            state.pop(name, None)
        if had:
            self.device_map = _recorded(self.device_map, self._ring(name).blocks, {}, window)

    def _refit(self, name: str) -> None:
        """Component ``name``'s plan changed: plan again, in the order they were planned, the other components whose
        phase no longer fits the budget beside it (an encoder planned before the DiT's kept blocks chose to stay,
        or beside another encoder that now keeps more)."""
        if self._refitting:
            return  # each is planned beside the others' plans in force; one pass settles them
        self._refitting = True
        try:
            for other in list(self.plans):
                plan = self.plans.get(other)
                if other != name and plan is not None and plan.memory > self._budget(other):
                    self._plan(other)
        finally:
            self._refitting = False

    def _budget(self, name: str) -> int:
        """Device bytes component ``name``'s plan may use: the budget less what stays on the device throughout (resident
        weights, other than its own, which its plan counts) and what other components hold while it runs."""
        _, own = self.costs[name]
        present = sum(self._present(name, other) for other in self.roles if other != name)
        return self.budget - (self.resident - own) - present - self._staging(name)

    def _staging(self, name: str) -> int:
        """Device bytes of component ``name``'s staging buffers while it runs (coded blocks only, ``compression``)."""
        ring = self.runtime.rings.get(name)
        return 0 if ring is None else ring.staging_device_bytes

    def _present(self, name: str, other: str) -> int:
        """Device bytes component ``other`` holds while ``name`` runs: all it holds if they run together (CLIP beside
        T5), else its kept blocks if they stay."""
        if self.roles[name].excludes(self.roles[other]):
            return self.kept_bytes.get(other, 0) if self.stays.get(other) else 0
        plan = self.plans.get(other)
        # A plan counts the component's non-block weights: those resident are counted in ``self.resident``.
        if plan is not None:
            return (
                plan.memory
                - plan.cost.other_bytes
                - plan.cost.activation_bytes
                + self._staging(other)
                + self.pinned.get(other, 0)
            )
        return self.pinned.get(other, 0) + self.slots.get(other, 0)

    def _ring(self, name: str):
        return next(r for r in self.execution.rings if r.component == name)

    def _seconds(self, name: str, plan: BlockPlan, stays: bool) -> float:
        """Predicted seconds of a call spent on component ``name``: its runs, and copying back once what left while
        the components it excludes ran: its pinned non-block weights, and its kept blocks unless they stay."""
        return self.runs[name] * plan.step_s + self._refetch(name, plan, stays)

    def _refetch(self, name: str, plan: BlockPlan, stays: bool) -> float:
        if not self._excludes_any(name):
            return 0.0
        kept = 0 if stays else sum(b.nbytes for b in plan.cost.blocks) - plan.streamed_bytes
        return (kept + self.pinned.get(name, 0)) / plan.bandwidth

    def _excludes_any(self, name: str) -> bool:
        return any(other != name and self.roles[name].excludes(role) for other, role in self.roles.items())

    def _may_stay(self, name: str) -> bool:
        # One DiT only: two (Wan2.2's experts) take turns with each other, and both staying would not fit.
        dits = [n for n, role in self.roles.items() if role is Role.DIT]
        return self.roles[name] is Role.DIT and dits == [name] and self._excludes_any(name)

    def _reserve(self, name: str) -> int:
        """Device bytes the phases of the components ``name`` excludes need beside its kept blocks: the largest phase
        (pinned components whole, streamed ones' slots as dispatched and their pinned weights outside the blocks, the
        components of one role together) and an
        activation allowance. Streamed components planned already are planned again within what is left
        (``_refit``)."""
        role = self.roles[name]
        largest = 0
        for other, other_role in self.roles.items():
            if other == name or not role.excludes(other_role):
                continue
            present = [n for n in self.roles if n != name and (n == other or not other_role.excludes(self.roles[n]))]
            largest = max(largest, sum(self.pinned.get(n, 0) + self.slots.get(n, 0) for n in present))
        return largest + int(ACTIVATION_SHARE * self.budget)

    def summary(self) -> str:
        """Per planned component: where its blocks are and what a call is predicted to cost it."""
        lines = []
        for name, plan in self.plans.items():
            refetch = self._refetch(name, plan, self.stays[name])
            if not self._excludes_any(name):
                where = "no other component takes turns with it: kept blocks stay on the device"
            elif self.stays[name]:
                where = "kept blocks stay on the device while the components it excludes run" + (
                    f"; its pinned weights outside the blocks leave and come back: {refetch:.2f} s per call" if refetch else ""
                )
            else:
                where = (
                    "kept blocks and pinned weights outside the blocks leave while the components it excludes run "
                    f"and come back: {refetch:.2f} s per call"
                )
            lines.append(
                f"{name or 'the DiT'}: {len(plan.resident)} of {len(plan.cost.blocks)} blocks resident, "
                f"{len(plan.kept)} in part, window {plan.window}; {where}; {self.runs[name]} runs per call x "
                f"{plan.step_s * 1e3:.1f} ms = {self._seconds(name, plan, self.stays[name]):.2f} s per call"
                f"{'' if self.learned or name in self.given else ' (runs assumed until the first call ends)'}"
                + self._raw_note(name, plan)
            )
        unplanned = [name or "the DiT" for name in self.roles if name not in self.plans]
        lines.append(
            f"predicted: {self.predicted_call_s:.2f} s of a call in the components planned"
            + (f"; not counted: {', '.join(unplanned)} (moved whole, resident, or not timed yet)" if unplanned else "")
        )
        return "\n".join(lines)

    def _raw_note(self, name: str, plan: BlockPlan) -> str:
        raw = self.raw_steps.get(name)
        if raw is None:
            return ""
        verdict = "slower" if raw > plan.step_s else "faster: its staging buffers cost more than its code saves"
        return f"; streaming its coded blocks raw would take {raw * 1e3:.1f} ms a step ({verdict})"

    @property
    def predicted_call_s(self) -> float:
        """Predicted seconds of one call of the pipeline spent in the planned components (their runs, and copying
        their kept blocks back where they leave)."""
        return sum(self._seconds(name, plan, self.stays[name]) for name, plan in self.plans.items())


def _recorded(dmap: DeviceMap, blocks: list[Unit], kept: dict[str, int], window: int) -> DeviceMap:
    """A new map: ``dmap`` with ``blocks`` placed as planned. A block kept whole is ``"gpu"``; a block streamed in part
    is the ``"layer-window"`` block with its kept submodules nested right after it as ``"gpu"`` entries, so a map saved
    from here and dispatched again keeps the same bytes on the device."""
    planned: dict[str, list[MapEntry]] = {}
    for block in blocks:
        regions, total = layout([ref.local for ref in block.tensors])
        size = kept.get(block.path, 0)
        if size and size >= total:
            planned[block.path] = [replace(dmap.entries[block.path], placement=Placement.GPU, nbytes=block.nbytes)]
            continue
        children: dict[str, int] = {}
        for ref, region in zip(block.tensors, regions):
            if region.offset < size:  # a kept prefix holds whole submodules (``runtime.host_buffer.split_points``)
                child = f"{block.path}.{direct_child(ref.qualname, block.path)}"
                children[child] = children.get(child, 0) + ref.nbytes
        entry = dmap.entries[block.path]
        planned[block.path] = [
            replace(entry, placement=Placement.LAYER_WINDOW, nbytes=block.nbytes - sum(children.values())),
            *(MapEntry(child, Placement.GPU, n, entry.dtype) for child, n in children.items()),
        ]
    out = dmap.copy()
    out.window = window
    out.entries = {}
    for path, entry in dmap.entries.items():
        if any(within(path, block.path) and path != block.path for block in blocks):
            continue  # a kept part an earlier plan recorded: this plan records the block's parts anew
        for new in planned.get(path, [entry]):
            out.entries[new.path] = new
    return out
