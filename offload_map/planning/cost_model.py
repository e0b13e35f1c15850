"""The cost model: predicted copy/compute timeline of one denoising step, from measured numbers.

Pure Python, no torch. Inputs are a ``ModelCost`` (each block's bytes and compute seconds in execution
order, the non-block weights and compute, an activation allowance) and the pinned host-to-device
bandwidth. ``simulate`` replays what the runtime does: the copy stream loads streamed blocks (or, for a block
whose first ``kept`` bytes stay on the device, the rest of it) one after another in execution order,
wrapping into the next step; load ``k`` goes into the slot that streamed
load ``k - window`` used, so it waits until that block has computed; a streamed block computes once its
load has landed and the previous block is done; a resident block only waits for the previous block.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Bytes that cross the link per raw byte under each ``compression``, measured on Flux-12B's bf16 blocks (random
# N(0, 0.02) weights; H200 results, ``benchmarks/results/h200/step_time_flux-12b_*``): for plans made before
# anything is coded (``offload-map plan --compression``). A dispatch plans with its own codes' share.
TYPICAL_LINK_SHARE = {"lossless": 0.712, "fp8": 0.501}


@dataclass(frozen=True)
class BlockCost:
    """One block: its module path, weight bytes, measured compute seconds per forward, and ``splits``: the byte
    counts of leading whole submodules that may stay on the device while the rest streams (ascending)."""

    path: str
    nbytes: int
    compute_s: float
    splits: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelCost:
    """What a DiT costs per forward.

    Attributes:
        blocks: every block, in execution order.
        other_bytes: weights outside the blocks (on the device whenever the component runs).
        other_compute_s: compute outside the blocks per forward (embeddings, final layers).
        activation_bytes: device memory a forward needs beyond weights (measured peak minus weights).
        copy_bandwidth: bytes/s the block copies achieved during the calibration forward, beside compute
            (None if not measured).
    """

    blocks: tuple[BlockCost, ...]
    other_bytes: int = 0
    other_compute_s: float = 0.0
    activation_bytes: int = 0
    copy_bandwidth: float | None = None

    @property
    def compute_s(self) -> float:
        return self.other_compute_s + sum(b.compute_s for b in self.blocks)


@dataclass
class Timeline:
    """Steady-state timeline of one step: per block (copy start, copy end, compute start, compute end)."""

    step_s: float
    rows: list[tuple[str, bool, float, float, float, float]] = field(default_factory=list)
    copy_busy_s: float = 0.0


def load_bytes(cost: ModelCost, index: int, kept: Mapping[int, int] | None) -> int:
    """Bytes of block ``index`` that a load copies: all of it, less what ``kept`` keeps on the device."""
    return cost.blocks[index].nbytes - (kept or {}).get(index, 0)


def streamed_bytes(cost: ModelCost, streamed: frozenset[int], kept: Mapping[int, int] | None = None) -> int:
    """Bytes the loads of blocks ``streamed`` copy in one step (their parts that ``kept`` does not keep)."""
    return sum(load_bytes(cost, i, kept) for i in streamed)


def simulate(
    cost: ModelCost,
    streamed: frozenset[int],
    window: int,
    bandwidth: float,
    steps: int = 4,
    kept: Mapping[int, int] | None = None,
) -> Timeline:
    """Predict the steady-state step time with blocks ``streamed`` (indices) through ``window`` slots, of which
    the first ``kept[i]`` bytes of block ``i`` stay on the device.

    Runs ``steps`` consecutive forwards and reports the last one, so the wrap-around prefetch of the
    next step's first blocks is accounted for. ``bandwidth`` is in bytes per second.
    """
    copy_free = 0.0  # when the copy stream finishes its last load
    compute_end = 0.0
    released: list[float] = []  # compute end of each streamed load, by load number
    for _ in range(steps):
        step_start, rows = compute_end, []
        compute_end += cost.other_compute_s
        for index, block in enumerate(cost.blocks):
            copy_start = copy_end = None
            start = compute_end
            if index in streamed:
                load = len(released)
                copy_start = max(copy_free, released[load - window] if load >= window else 0.0)
                copy_end = copy_free = copy_start + load_bytes(cost, index, kept) / bandwidth
                start = max(start, copy_end)
            compute_end = start + block.compute_s
            if index in streamed:
                released.append(compute_end)
            rows.append((block.path, index in streamed, copy_start, copy_end, start, compute_end))
    busy = streamed_bytes(cost, streamed, kept) / bandwidth
    return Timeline(compute_end - step_start, rows, busy)


def floor_s(cost: ModelCost, streamed: frozenset[int], bandwidth: float, kept: Mapping[int, int] | None = None) -> float:
    """The physical limit: max(all compute, streamed bytes / bandwidth)."""
    return max(cost.compute_s, streamed_bytes(cost, streamed, kept) / bandwidth)
