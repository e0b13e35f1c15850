"""The budget planner: which blocks stay resident, and how many slots, for the fastest predicted step.

Pure Python on a ``ModelCost`` and a bandwidth (no torch, no device). For each window size it walks a
greedy path from "every block streamed" towards "every block resident", each step making resident the
block that shortens the predicted step most per byte it costs (spreading residents so their compute
hides the copies of their streamed neighbours). The plan for a budget is the fastest point of any path
whose memory fits; because the paths do not depend on the budget, more budget never predicts a slower
step.

Memory of a plan = non-block weights + resident blocks + window x the largest streamed block +
activation allowance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cost_model import ModelCost, Timeline, floor_s, simulate
from .device_map import human_bytes

WINDOWS = (1, 2, 3, 4)
# Slower "links" are corrupt profiles; they would overflow the simulated timeline.
MIN_BANDWIDTH = 1e3


class BudgetTooSmall(ValueError):
    """The budget cannot hold even the smallest plan; ``minimum`` says what can."""

    def __init__(self, budget: int, minimum: int) -> None:
        super().__init__(
            f"a device budget of {human_bytes(budget)} is below the minimum of {human_bytes(minimum)} "
            "(resident weights + one slot for the largest block, + activations where measured); give at least that much"
        )
        self.budget = budget
        self.minimum = minimum


@dataclass(frozen=True)
class BlockPlan:
    """The planner's answer for one DiT."""

    cost: ModelCost
    bandwidth: float
    budget: int
    window: int
    streamed: frozenset[int]
    timeline: Timeline

    @property
    def resident(self) -> list[int]:
        return [i for i in range(len(self.cost.blocks)) if i not in self.streamed]

    @property
    def step_s(self) -> float:
        return self.timeline.step_s

    @property
    def memory(self) -> int:
        return plan_memory(self.cost, self.streamed, self.window)

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
            return (f"Copies bound the step: {len(self.streamed)} streamed blocks need {copy * 1e3:.1f} ms on the link "
                    f"against {compute * 1e3:.1f} ms of compute; more budget keeps more blocks resident.")
        if self.step_s > 1.05 * max(copy, compute):
            return "Copies and compute are poorly overlapped: a larger window or more resident blocks would help."
        return f"Compute bounds the step ({compute * 1e3:.1f} ms); copies ({copy * 1e3:.1f} ms) hide under it."

    def explain(self) -> str:
        """Per block: placement, bytes, predicted copy and compute time and which bounds it; then totals."""
        lines = [f"{'block':<40} {'placement':<12} {'bytes':>10} {'copy ms':>8} {'compute ms':>10}  bound"]
        for index, (path, streamed, c0, c1, s0, s1) in enumerate(self.timeline.rows):
            block = self.cost.blocks[index]
            copy_ms = block.nbytes / self.bandwidth * 1e3 if streamed else 0.0
            bound = "copy" if streamed and copy_ms > block.compute_s * 1e3 else "compute"
            lines.append(f"{path:<40} {'layer-window' if streamed else 'gpu':<12} {human_bytes(block.nbytes):>10} "
                         f"{copy_ms:>8.2f} {block.compute_s * 1e3:>10.2f}  {bound}")
        floor = floor_s(self.cost, self.streamed, self.bandwidth)
        lines += [
            f"window {self.window}; {len(self.streamed)} of {len(self.cost.blocks)} blocks streamed "
            f"({human_bytes(sum(self.cost.blocks[i].nbytes for i in self.streamed))}) at {self.bandwidth / 1e9:.1f} GB/s",
            f"predicted step {self.step_s * 1e3:.1f} ms (floor {floor * 1e3:.1f} ms); predicted peak "
            f"{human_bytes(self.memory)} of the {human_bytes(self.budget)} budget "
            f"(activation allowance {human_bytes(self.cost.activation_bytes)})",
            self.bottleneck(),
        ]
        return "\n".join(lines)


def plan_memory(cost: ModelCost, streamed: frozenset[int], window: int) -> int:
    """Device bytes a plan holds at its peak (see the module docstring)."""
    resident = sum(b.nbytes for i, b in enumerate(cost.blocks) if i not in streamed)
    slots = window * max((cost.blocks[i].nbytes for i in streamed), default=0) if streamed else 0
    return cost.other_bytes + resident + slots + cost.activation_bytes


def minimum_memory(cost: ModelCost) -> int:
    """The smallest plan's memory: everything streamed through one slot."""
    return plan_memory(cost, frozenset(range(len(cost.blocks))), 1)


def plan_blocks(cost: ModelCost, budget: int, bandwidth: float) -> BlockPlan:
    """The fastest predicted plan within ``budget`` bytes.

    Raises:
        BudgetTooSmall: ``budget`` is below ``minimum_memory(cost)``.
        ValueError: ``bandwidth`` is not a finite number of at least ``MIN_BANDWIDTH`` bytes/s.

    Example:
        >>> from offload_map.cost_model import BlockCost
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
    best: tuple[float, int, int, frozenset[int]] | None = None
    for window in WINDOWS:
        if window > n:
            break
        for streamed in _greedy_path(cost, window, bandwidth):
            memory = plan_memory(cost, streamed, window)
            if memory > budget:
                continue
            step = simulate(cost, streamed, window, bandwidth).step_s
            key = (round(step, 9), memory, window, streamed)
            if best is None or key[:3] < best[:3]:
                best = key
    assert best is not None  # the all-streamed, window-1 point fits
    _, _, window, streamed = best
    return BlockPlan(cost, bandwidth, budget, window, streamed, simulate(cost, streamed, window, bandwidth))


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
