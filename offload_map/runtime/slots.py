"""Device slots: the ``window`` buffers that a DiT's streamed blocks take turns in.

Ownership (``SlotPool``, one per streamed DiT and residency):

- ``Slot.buffer``: a device ``uint8`` buffer, allocated by the pool on the stream current at allocation (its
  *allocation stream*), freed by ``SlotPool.free``. Written only by copies on the copy stream; read only by
  the block computing in it, on the compute stream.
- ``Slot.ready``: recorded on the copy stream after each copy into the slot; the compute stream waits on it
  before the block reads the slot (``OffloadedUnit.wait``).
- ``Slot.free``: recorded on the compute stream after the block that read the slot ran, and once on the
  allocation stream right after allocation (the memory may still be in use by work the caching allocator
  freed it from); the copy stream waits on it before the next copy overwrites the slot.
- ``SlotPool.free`` makes the allocation stream wait for every slot's last copy and last reader before it
  lets go of the buffers: the caching allocator hands freed memory to later allocations on that stream in
  stream order, so nothing reuses a slot that a copy or a block (on any stream) still uses.

Which unit goes into which slot is the prefetcher's choice; moving bytes in and out is the unit's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Slot:
    """One device buffer, its two events, and which unit's bytes it holds (``None``: nothing usable).

    ``views`` caches, per unit, that unit's streamed tensors as views into ``buffer``.
    """

    index: int
    buffer: torch.Tensor
    ready: object
    free: object
    holds: object = None
    views: dict = field(default_factory=dict)


class SlotPool:
    """``count`` slots of ``nbytes`` bytes each on the ordering's device (see the module docstring).

    Args:
        count: number of slots (the window).
        nbytes: bytes per slot (the largest streamed part of a block, as the copier pads it).
        ordering: the dispatch's ``CudaOrdering``/``SyncOrdering``.
    """

    def __init__(self, count: int, nbytes: int, ordering) -> None:
        self.ordering = ordering
        self.nbytes = nbytes
        self.allocation_stream = ordering.compute_stream()
        self.slots: list[Slot] = []
        for index in range(count):
            slot = Slot(index, torch.empty(nbytes, dtype=torch.uint8, device=ordering.device), ordering.event(), ordering.event())
            ordering.record_compute(slot.free)
            self.slots.append(slot)

    @property
    def device_bytes(self) -> int:
        return self.nbytes * len(self.slots)

    def free(self) -> None:
        """Give the buffers back once their last copy and last reader are done (stream-ordered, no host wait).
        Safe to call twice."""
        for slot in self.slots:
            self.ordering.stream_waits(self.allocation_stream, slot.ready)
            self.ordering.stream_waits(self.allocation_stream, slot.free)
            slot.holds = None
            slot.views.clear()
        self.slots = []
