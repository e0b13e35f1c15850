"""Calibration: timing one forward of a streamed DiT, block by block, into a ``ModelCost``.

A ``BlockTimer`` is armed on a ``BlockRing`` (``Runtime.arm_calibration``). It lets ``skip`` forwards go by untimed (the first forward
of a process pays for lazy CUDA initialisation: library handles, kernel loading), then times one. It puts a timing mark on the compute
stream when the forward starts (resetting the allocator's peak counter, once), when each block starts (after its copy has landed) and ends, and when
the forward ends, and marks each block copy the forward issues on the copy stream; then it waits once for
the last mark (the only host synchronisation, and only in this forward), turns the marks into per-block
compute seconds and the bandwidth the copies achieved while compute ran beside them (the byte-weighted
median of the copies' rates, which a few slow copies do not drag down as a total over all of them would;
the planner uses the lower of this and the idle probe), measures the activation memory the forward needed
beyond what was allocated when it began, and hands the ``ModelCost`` to ``on_done``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from ..planning.cost_model import BlockCost, ModelCost


def median_rate(copies: list[tuple[int, float]]) -> float | None:
    """The byte-weighted median rate (bytes/s) of ``(bytes, seconds)`` copies; None if nothing was copied.

    Example:
        >>> median_rate([(100, 1.0), (100, 1.0), (100, 10.0)])
        100.0
    """
    timed = sorted((n / t, n) for n, t in copies if n and t > 0)
    half, seen = sum(n for _, n in timed) / 2, 0
    for rate, n in timed:
        seen += n
        if seen >= half:
            return rate
    return None


class BlockTimer:
    """Times one forward (see the module docstring).

    Args:
        ordering: the runtime's ordering (``stamp``/``seconds``/``wait_for``).
        paths: module path of each block, by block index.
        nbytes: weight bytes of each block, by block index.
        splits: where each block's bytes may be cut (``PackedTensors.split_points``), by block index.
        other_bytes: the DiT's weights outside its blocks.
        on_done: receives the ``ModelCost`` after the forward.
        skip: forwards to let go by before the timed one.
    """

    def __init__(
        self,
        ordering,
        paths: list[str],
        nbytes: list[int],
        splits: list[tuple[int, ...]],
        other_bytes: int,
        on_done: Callable[[ModelCost], None],
        skip: int = 1,
    ) -> None:
        self.ordering = ordering
        self.paths = paths
        self.nbytes = nbytes
        self.splits = splits
        self.other_bytes = other_bytes
        self.on_done = on_done
        self.skip = skip
        self.marks: list[tuple[int, object, object]] = []
        self.pending: dict[int, object] = {}
        self.copies: list[tuple[int, object, object]] = []  # filled by OffloadedUnit.load while timing
        self.start = None
        self.base_memory = 0

    @property
    def timing(self) -> bool:
        """Whether the timed forward is under way."""
        return not self.skip and self.start is not None

    def forward_start(self) -> None:
        if self.skip:
            return
        self.marks, self.pending, self.copies = [], {}, []  # a forward that raised must not leave marks behind
        if self.ordering.asynchronous:
            torch.cuda.reset_peak_memory_stats(self.ordering.device)
            self.base_memory = torch.cuda.memory_allocated(self.ordering.device)
        self.start = self.ordering.stamp()

    def block_start(self, block: int) -> None:
        if not self.skip:
            self.pending[block] = self.ordering.stamp()

    def block_end(self, block: int) -> None:
        if not self.skip:
            self.marks.append((block, self.pending.pop(block), self.ordering.stamp()))

    def forward_end(self, sequence: list[int]) -> bool:
        """Finish a forward; returns True once the timed forward is done (and ``on_done`` was called)."""
        if self.skip:
            self.skip -= 1
            return False
        end = self.ordering.stamp()
        self.ordering.wait_for(end)
        if self.copies:  # prefetches of the next forward may still be landing
            self.ordering.wait_for(self.copies[-1][2])
        seconds = self.ordering.seconds
        compute: dict[int, float] = defaultdict(float)
        for block, start, stop in self.marks:
            compute[block] += seconds(start, stop)
        other = 0.0
        if self.marks:
            other = seconds(self.start, self.marks[0][1]) + seconds(self.marks[-1][2], end)
        activation = 0
        if self.ordering.asynchronous:
            activation = max(torch.cuda.max_memory_allocated(self.ordering.device) - self.base_memory, 0)
        bandwidth = median_rate([(n, seconds(start, stop)) for n, start, stop in self.copies])
        unique = list(dict.fromkeys(sequence))
        blocks = tuple(BlockCost(self.paths[b], self.nbytes[b], compute[b], self.splits[b]) for b in unique)
        self.on_done(ModelCost(blocks, self.other_bytes, other, activation, bandwidth))
        return True
