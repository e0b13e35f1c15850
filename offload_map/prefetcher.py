"""The prefetcher: which block to copy into which slot next, so the copy stream never idles.

State (one ``Prefetcher`` per ``SlotRing``):

- ``sequence``: every block in execution order for one forward of the DiT. Declaration order at first;
  the first forward's actual sequence replaces it (Flux runs double then single blocks; some models
  skip or repeat blocks).
- ``order``: the streamed blocks of ``sequence`` (resident blocks need no copy).
- ``cursor``: the position in ``order`` of the next streamed block expected to run. It wraps, so while
  the last blocks of a step compute, the first blocks of the next step are already being copied.
- ``queue``: loads already issued for the next positions, ``(position, slot)`` in order.
- ``idle``: slots that no queued or running block needs, least recently released first.

A block that runs out of order (only possible after the first forward if the model changes its path) is
loaded on demand with one warning; the result is still right, only slower. A forward that ends early
(an exception inside a block, or a skipped tail) is detected when the next forward starts, and the ring
is reset to the start of the order.

An optional ``timer`` (``calibration.BlockTimer``) is told when each block starts and ends computing.
"""

from __future__ import annotations

import logging
from collections import deque

from .slot_ring import Slot, SlotRing

logger = logging.getLogger("offload_map")


class Prefetcher:
    """Drives a ``SlotRing`` from block enter/exit and forward begin/end events (see module docstring)."""

    def __init__(self, ring: SlotRing) -> None:
        self.ring = ring
        self.sequence = list(range(len(ring.blocks)))
        self.learning = True
        self.recorded: list[int] = []
        self.warned = False
        self.timer = None
        self.running: Slot | None = None
        self.restart()

    def restart(self) -> None:
        """Forget issued loads and slot assignments (after the ring's slots or residents changed)."""
        self.order = [b for b in self.sequence if b not in self.ring.resident]
        self.cursor = 0
        self.queue: deque[tuple[int, Slot]] = deque()
        self.idle: deque[Slot] = deque(self.ring.slots)
        self.running = None

    def forget_slots(self) -> None:
        """Drop every reference to the ring's current slots (before the ring replaces them)."""
        self.queue = deque()
        self.idle = deque()
        self.running = None

    def begin_forward(self) -> None:
        """Called before each forward of the DiT."""
        if self.running is not None:  # the last forward raised inside a block
            self._release_running()
        if self.cursor != 0:
            self._reset()
        self.recorded = []
        if self.timer is not None:
            self.timer.forward_start()
        self._fill()

    def end_forward(self) -> None:
        """Called after each forward of the DiT; the first one teaches the order."""
        if self.learning and self.recorded:
            self.learning = False
            if self.recorded != self.sequence:
                logger.debug("%s: learned block order %s", self.ring.name, self.recorded)
                self.sequence = self.recorded
                self.order = [b for b in self.sequence if b not in self.ring.resident]
                self._reset()
            self._fill()
        if self.timer is not None:
            timer, self.timer = self.timer, None
            if not timer.forward_end(self.sequence):
                self.timer = timer

    def enter(self, block: int) -> None:
        """The block is about to run: make sure its weights are (or will be) in place, ordered before it."""
        if self.learning:
            self.recorded.append(block)
        if block not in self.ring.resident:
            if self.queue and self.order[self.queue[0][0]] == block:
                position, slot = self.queue.popleft()
                self.cursor = (position + 1) % len(self.order)
            else:
                slot = self._on_demand(block)
            self.running = slot
            self.ring.before_compute(slot)
        if self.timer is not None:
            self.timer.block_start(block)

    def exit(self, block: int) -> None:
        """The block has been enqueued to run; free its slot for the next copy."""
        if self.timer is not None:
            self.timer.block_end(block)
        if self.running is not None:
            self._release_running()
        self._fill()

    def _timed_copies(self) -> list | None:
        return self.timer.copies if self.timer is not None and self.timer.timing else None

    def _release_running(self) -> None:
        self.ring.after_compute(self.running)
        self.idle.append(self.running)
        self.running = None

    def _reset(self) -> None:
        self.cursor = 0
        while self.queue:
            self.idle.append(self.queue.popleft()[1])

    def _on_demand(self, block: int) -> Slot:
        if not self.learning and not self.warned:
            self.warned = True
            logger.warning(
                "%s: block %s ran out of the learned order; loading it on demand (correct but slower). "
                "This warning is shown once.", self.ring.name, self.ring.paths[block],
            )
        self._reset()
        slot = self._take_slot(block)
        if slot.block != block:
            self.ring.load(slot, block, on_demand=True, timed=self._timed_copies())
        if block in self.order:
            self.cursor = (self.order.index(block) + 1) % len(self.order)
        return slot

    def _take_slot(self, block: int) -> Slot:
        for slot in self.idle:
            if slot.block == block:
                self.idle.remove(slot)
                return slot
        return self.idle.popleft()

    def _fill(self) -> None:
        while self.idle and self.order:
            position = (self.cursor + len(self.queue)) % len(self.order)
            block = self.order[position]
            if any(slot.block == block for _, slot in self.queue) or (self.running and self.running.block == block):
                return  # a block can sit in one slot only: wait until its earlier use is done
            if len(self.queue) >= len(self.order):
                return
            slot = self._take_slot(block)
            if slot.block != block:
                self.ring.load(slot, block, timed=self._timed_copies())
            self.queue.append((position, slot))
