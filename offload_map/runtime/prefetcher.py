"""The prefetcher: which block to load into which slot next, so the copy stream never idles.

State (one ``Prefetcher`` per ``BlockRing``):

- ``sequence``: every block in execution order for one forward of the DiT. Declaration order at first;
  the first forward's actual sequence replaces it (Flux runs double then single blocks; some models
  skip or repeat blocks).
- ``order``: the blocks of ``sequence`` that stream something (blocks kept whole need no load).
- ``cursor``: the position in ``order`` of the next streamed block expected to run. It wraps, so while
  the last blocks of a step compute, the first blocks of the next step are already being copied.
- ``queue``: loads already issued for the next positions, ``(position, slot)`` in order; the units are
  ``LOADED`` (``runtime.unit``) and their modules still view host memory.
- ``idle``: slots that no queued or running block needs, least recently released first.

A block that runs out of order (only possible after the first forward if the model changes its path) is
loaded on demand with one warning; the result is still right, only slower. A forward that ends early
(an exception, even a ``KeyboardInterrupt``, inside a block, or a skipped tail) is settled when the next
forward starts: the running block is released and the ring restarts at the start of the order.

An optional ``timer`` (``calibration.BlockTimer``) is told when each block starts and ends computing.
"""

from __future__ import annotations

import logging
from collections import deque

from .slots import Slot
from .unit import OffloadedUnit, TailState

logger = logging.getLogger("offload_map")


class Prefetcher:
    """Drives the units of one ring through ``slots`` from block enter/exit and forward begin/end events.

    Args:
        name: the DiT's component name (for the warning).
        units: the ring's units, by block index.
        copier: how a tail reaches its slot (``sharded_copy``).
        stats: transfer counters (``report.TransferStats``).
    """

    def __init__(self, name: str, units: list[OffloadedUnit], copier, stats) -> None:
        self.name = name
        self.units = units
        self.copier = copier
        self.stats = stats
        self.sequence = list(range(len(units)))
        self.learning = True
        self.recorded: list[int] = []
        self.warned = False
        self.timer = None
        self.running: int | None = None
        self.order: list[int] = []
        self.cursor = 0
        self.queue: deque[tuple[int, Slot]] = deque()
        self.idle: deque[Slot] = deque()

    def restart(self, slots: list[Slot]) -> None:
        """Start over with ``slots`` (after the ring's slots or kept parts changed); every unit is on the host."""
        self.order = [b for b in self.sequence if self.units[b].streamed_bytes]
        self.cursor = 0
        self.queue = deque()
        self.idle = deque(slots)
        self.running = None

    def settle(self) -> None:
        """Release the running block and cancel issued loads: every unit's tail on the host. Safe to call twice."""
        if self.running is not None:
            self._release_running()
        self._reset()

    def begin_forward(self) -> None:
        """Called before each forward of the DiT."""
        if self.running is not None or self.cursor != 0:  # the last forward ended early
            self.settle()
        self.recorded = []
        if self.timer is not None:
            self.timer.forward_start()
        self._fill()

    def end_forward(self) -> None:
        """Called after each forward of the DiT; the first one teaches the order."""
        if self.learning and self.recorded:
            self.learning = False
            if self.recorded != self.sequence:
                logger.debug("%s: learned block order %s", self.name, self.recorded)
                self.sequence = self.recorded
                self._reset()
                self.order = [b for b in self.sequence if self.units[b].streamed_bytes]
            self._fill()
        if self.timer is not None:
            timer, self.timer = self.timer, None
            if not timer.forward_end(self.sequence):
                self.timer = timer

    def enter(self, block: int) -> None:
        """The block is about to run: its tail (if any) in a slot, the compute stream waiting for the copy."""
        if self.running is not None:  # the last block raised and the model caught it: that use is over
            self._release_running()
        if self.learning:
            self.recorded.append(block)
        unit = self.units[block]
        if unit.streamed_bytes:
            if self.queue and self.order[self.queue[0][0]] == block:
                position, _ = self.queue.popleft()
                self.cursor = (position + 1) % len(self.order)
            else:
                self._on_demand(block)
            unit.wait()
            self.running = block
        if self.timer is not None:
            self.timer.block_start(block)

    def exit(self, block: int) -> None:
        """The block's forward has been enqueued: free its slot for the next load."""
        if self.timer is not None:
            self.timer.block_end(block)
        if self.running is not None:
            self._release_running()
        self._fill()

    def _release_running(self) -> None:
        unit = self.units[self.running]
        slot = unit.slot
        unit.release()
        self.idle.append(slot)
        self.running = None

    def _reset(self) -> None:
        self.cursor = 0
        while self.queue:
            position, slot = self.queue.popleft()
            self.units[self.order[position]].cancel()
            self.idle.append(slot)

    def _load(self, block: int, slot: Slot, on_demand: bool) -> None:
        timed = self.timer.copies if self.timer is not None and self.timer.timing else None
        try:
            copied = self.units[block].load(slot, self.copier, timed)
        except BaseException:
            self.idle.appendleft(slot)  # the unit stayed on the host; the slot is free for the next load
            raise
        if copied:
            self.stats.add_block(copied, on_demand)

    def _on_demand(self, block: int) -> None:
        if not self.learning and not self.warned:
            self.warned = True
            logger.warning(
                "%s: block %s ran out of the learned order; loading it on demand (correct but slower). "
                "This warning is shown once.",
                self.name,
                self.units[block].path,
            )
        self._reset()
        self._load(block, self._take_slot(block), on_demand=True)
        if block in self.order:
            self.cursor = (self.order.index(block) + 1) % len(self.order)

    def _take_slot(self, block: int) -> Slot:
        # A slot that still holds the block's bytes saves the copy.
        for slot in self.idle:
            if slot.holds is self.units[block]:
                self.idle.remove(slot)
                return slot
        return self.idle.popleft()

    def _fill(self) -> None:
        while self.idle and self.order and len(self.queue) < len(self.order):
            position = (self.cursor + len(self.queue)) % len(self.order)
            block = self.order[position]
            if self.units[block].state is not TailState.HOST:
                return  # a block sits in one slot at a time: wait until its earlier use is done
            slot = self._take_slot(block)
            self._load(block, slot, on_demand=False)
            self.queue.append((position, slot))
