"""The budget planner: which blocks stay resident, and how many slots, for the fastest predicted step.

Pure Python on a ``ModelCost`` and a bandwidth (no torch, no device). Two families of candidate plans,
for each window size:

- whole blocks: a greedy path from "every block streamed" towards "every block resident", each step
  making resident the block that shortens the predicted step most per byte it costs (spreading residents
  so their compute hides the copies of their streamed neighbours);
- split blocks: at each of a fine ladder of levels, every block streams about ``level`` times the bytes the
  link moves while it computes and keeps the rest on the device (whole submodules, at one of its
  ``BlockCost.splits``); rounding to the split options carries its error to the next block, so the streamed
  parts spread evenly under the compute. A slot only needs to hold the largest streamed part, not the
  largest block, so at a tight budget the room saved on slots keeps more weights resident (Flux-12B in
  12 GiB: two 680 MB slots become two 283 MB ones).

The plan for a budget is the fastest candidate whose memory fits; because no candidate depends on the
budget, more budget never predicts a slower step. Among candidates predicted equally fast (copies hidden under
compute, the step is the compute's), the one that streams the fewest bytes wins, then the least memory: the model
overlaps copies perfectly, and a plan whose copies just fit under the compute (the knee) ran 3% slower than
resident on the H200 (Flux pipeline, auto 24 GiB) where the budget had room to keep more.

Memory of a plan = non-block weights + resident blocks and kept parts + window x the largest streamed
part + activation allowance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..mapping.memory import BudgetTooSmall, device_footprint
from ..mapping.sizes import human_bytes, human_rate
from .cost_model import ModelCost, Timeline, floor_s, load_bytes, simulate, streamed_bytes

WINDOWS = (1, 2, 3, 4)
# Split-block levels: a block's streamed part aims at level x (bytes the link moves during its compute).
# Geometric and fine (1% apart), from copies far under compute to every block streamed whole.
LEVELS = tuple(0.02 * 1.01**k for k in range(800))
# Slower "links" are corrupt profiles; they would overflow the simulated timeline.
MIN_BANDWIDTH = 1e3


@dataclass(frozen=True)
class BlockPlan:
    """The planner's answer for one DiT."""

    cost: ModelCost
    bandwidth: float
    budget: int
    window: int
    streamed: frozenset[int]
    timeline: Timeline
    kept: Mapping[int, int] = field(default_factory=dict)  # streamed block -> leading bytes kept on the device

    @property
    def resident(self) -> list[int]:
        return [i for i in range(len(self.cost.blocks)) if i not in self.streamed]

    @property
    def step_s(self) -> float:
        return self.timeline.step_s

    @property
    def memory(self) -> int:
        return plan_memory(self.cost, self.streamed, self.window, self.kept)

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied per step."""
        return streamed_bytes(self.cost, self.streamed, self.kept)

    @property
    def all_resident(self) -> bool:
        return not self.streamed

    def bottleneck(self) -> str:
        """One sentence: what bounds the step."""
        if self.all_resident:
            return "Everything fits the budget: every block is resident and the step runs at compute speed."
        copy = self.timeline.copy_busy_s
        compute = self.cost.compute_s
        if copy > 1.02 * compute:
            return (
                f"Copies bound the step: {len(self.streamed)} streamed blocks need {copy * 1e3:.1f} ms on the link "
                f"against {compute * 1e3:.1f} ms of compute; more budget keeps more blocks resident."
            )
        if self.step_s > 1.05 * max(copy, compute):
            return "Copies and compute are poorly overlapped: a larger window or more resident blocks would help."
        return f"Compute bounds the step ({compute * 1e3:.1f} ms); copies ({copy * 1e3:.1f} ms) hide under it."

    def explain(self) -> str:
        """Per block: placement, bytes, predicted copy and compute time and which bounds it; then totals."""
        lines = [f"{'block':<40} {'placement':<12} {'bytes':>10} {'kept':>10} {'copy ms':>8} {'compute ms':>10}  bound"]
        for index, (path, streamed, *_) in enumerate(self.timeline.rows):
            block = self.cost.blocks[index]
            copy_ms = load_bytes(self.cost, index, self.kept) / self.bandwidth * 1e3 if streamed else 0.0
            kept = self.kept.get(index, 0) if streamed else block.nbytes
            bound = "copy" if streamed and copy_ms > block.compute_s * 1e3 else "compute"
            lines.append(
                f"{path:<40} {'layer-window' if streamed else 'gpu':<12} {human_bytes(block.nbytes):>10} "
                f"{human_bytes(kept) if kept else '-':>10} {copy_ms:>8.2f} {block.compute_s * 1e3:>10.2f}  {bound}"
            )
        floor = floor_s(self.cost, self.streamed, self.bandwidth, self.kept)
        split = f", {len(self.kept)} of them in part" if self.kept else ""
        lines += [
            f"window {self.window}; {len(self.streamed)} of {len(self.cost.blocks)} blocks streamed{split} "
            f"({human_bytes(self.streamed_bytes)} per step) at {human_rate(self.bandwidth)}",
            f"predicted step {self.step_s * 1e3:.1f} ms (floor {floor * 1e3:.1f} ms); predicted peak "
            f"{human_bytes(self.memory)} of the {human_bytes(self.budget)} this plan may use "
            f"(activation allowance {human_bytes(self.cost.activation_bytes)})",
            self.bottleneck(),
        ]
        return "\n".join(lines)


def plan_memory(cost: ModelCost, streamed: frozenset[int], window: int, kept: Mapping[int, int] | None = None) -> int:
    """Device bytes a plan holds at its peak (see the module docstring)."""
    loads = [load_bytes(cost, i, kept) for i in streamed]
    resident = cost.other_bytes + sum(b.nbytes for b in cost.blocks) - sum(loads)
    return device_footprint(resident, max(loads, default=0), window, cost.activation_bytes)


def minimum_memory(cost: ModelCost) -> int:
    """The smallest plan's memory: everything streamed through one slot."""
    return plan_memory(cost, frozenset(range(len(cost.blocks))), 1)


def plan_blocks(cost: ModelCost, budget: int, bandwidth: float) -> BlockPlan:
    """The fastest predicted plan within ``budget`` bytes.

    Raises:
        BudgetTooSmall: ``budget`` is below ``minimum_memory(cost)``.
        ValueError: ``bandwidth`` is not a finite number of at least ``MIN_BANDWIDTH`` bytes/s.

    Example:
        >>> from offload_map.planning.cost_model import BlockCost
        >>> cost = ModelCost(tuple(BlockCost(f"blocks.{i}", 100, 1e-3) for i in range(4)))
        >>> plan_blocks(cost, 10_000, bandwidth=1e5).all_resident
        True
    """
    if not math.isfinite(bandwidth) or bandwidth < MIN_BANDWIDTH:
        raise ValueError(f"bandwidth must be a finite number of at least {MIN_BANDWIDTH:g} bytes/s, got {bandwidth!r}")
    n = len(cost.blocks)
    if plan_memory(cost, frozenset(), 1) <= budget:
        return BlockPlan(cost, bandwidth, budget, 1, frozenset(), simulate(cost, frozenset(), 1, bandwidth))
    if minimum_memory(cost) > budget:
        raise BudgetTooSmall(budget, minimum_memory(cost))
    best = None
    split = _split_candidates(cost, bandwidth)
    for window in WINDOWS:
        if window > n:
            break
        for streamed, kept in [*((streamed, {}) for streamed in _greedy_path(cost, window, bandwidth)), *split]:
            memory = plan_memory(cost, streamed, window, kept)
            if memory > budget:
                continue
            step = simulate(cost, streamed, window, bandwidth, kept=kept).step_s
            key = (round(step, 9), streamed_bytes(cost, streamed, kept), memory, window)
            if best is None or key < best[0]:
                best = (key, streamed, kept)
    assert best is not None  # the all-streamed, window-1 point fits
    (*_, window), streamed, kept = best
    return BlockPlan(cost, bandwidth, budget, window, streamed, simulate(cost, streamed, window, bandwidth, kept=kept), kept)


def _split_candidates(cost: ModelCost, bandwidth: float) -> list[tuple[frozenset[int], dict[int, int]]]:
    # At each level, a block's streamed part aims at level x its compute time's worth of link bytes. A block can
    # only stream what a split point leaves, so the part is rounded to the nearest option and the rounding error
    # carried to the next block (error diffusion): consecutive blocks alternate between the options around
    # their aim, and every stretch of the step streams its share. Window and budget do not enter.
    out, seen = [], set()
    options = [sorted({0, *(b.nbytes - p for p in (0, *b.splits))}) for b in cost.blocks]
    for level in LEVELS:
        error, parts = 0.0, []
        for block, opts in zip(cost.blocks, options):
            aim = level * block.compute_s * bandwidth + error
            part = min(opts, key=lambda o: (abs(o - aim), o))
            error = max(-opts[-1], min(opts[-1], aim - part))  # a block that cannot stream more does not bank it
            parts.append(part)
        key = tuple(parts)
        if key in seen:
            continue
        seen.add(key)
        streamed = frozenset(i for i, part in enumerate(parts) if part)
        out.append((streamed, {i: cost.blocks[i].nbytes - parts[i] for i in streamed if parts[i] < cost.blocks[i].nbytes}))
    return out


def _greedy_path(cost: ModelCost, window: int, bandwidth: float):
    streamed = frozenset(range(len(cost.blocks)))
    yield streamed
    while streamed:
        base_step = simulate(cost, streamed, window, bandwidth).step_s
        base_memory = plan_memory(cost, streamed, window)
        choice = None
        for index in sorted(streamed):
            trial = streamed - {index}
            gain = base_step - simulate(cost, trial, window, bandwidth).step_s
            extra = max(plan_memory(cost, trial, window) - base_memory, 1)
            score = (gain / extra, cost.blocks[index].nbytes)
            if choice is None or score > choice[0]:
                choice = (score, trial)
        streamed = choice[1]
        yield streamed
