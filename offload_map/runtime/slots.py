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
- ``SlotPool.staging`` (coded blocks only, ``coded_host``): a ``Staging``, device ``uint8`` buffers shared by
  the slots, allocated before them on the allocation stream (so each slot's first ``free`` event, and a kept
  part's ``allocated`` event, come after it). A piece's planes are copied into a buffer on the copy stream,
  which then records the buffer's ``copied`` event; the decode stream waits on it, decodes the piece out of
  the buffer into its slot and records ``decoded``; the copy stream waits on ``decoded`` before it copies into
  that buffer again. Freed by ``SlotPool.free`` after the allocation stream waited for the copy and decode
  streams as they are then.

Which unit goes into which slot is the prefetcher's choice; moving bytes in and out is the unit's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..mapping.memory import STAGING_BUFFERS


@dataclass(eq=False)
class Slot:
    """One device buffer, its two events, and which unit's bytes it holds (``None``: nothing usable).

    ``views`` caches, per unit, that unit's streamed tensors as views into ``buffer``; ``staging`` is the pool's
    staging buffer (or None).
    """

    index: int
    buffer: torch.Tensor
    ready: object
    free: object
    holds: object = None
    views: dict = field(default_factory=dict)
    staging: "Staging | None" = None


@dataclass(eq=False)
class StagingBuffer:
    """One staging buffer and its two events (see the module docstring); ``views`` caches, per coded piece (or part
    of one), its planes as views into ``tensor``."""

    tensor: torch.Tensor
    copied: object
    decoded: object
    views: dict = field(default_factory=dict)


class Staging:
    """``STAGING_BUFFERS`` staging buffers of ``nbytes`` bytes each, used in turn (see the module docstring)."""

    @torch.inference_mode(False)  # see ``SlotPool``
    def __init__(self, nbytes: int, ordering) -> None:
        self.ordering = ordering
        self.buffers = [
            StagingBuffer(torch.empty(nbytes, dtype=torch.uint8, device=ordering.device), ordering.event(), ordering.event())
            for _ in range(STAGING_BUFFERS)
        ]
        self.turn = 0

    @property
    def device_bytes(self) -> int:
        return sum(buffer.tensor.numel() for buffer in self.buffers)

    def take(self) -> StagingBuffer:
        """The buffer whose turn it is, once free: the copy stream waits for the decode that last read it. Call on
        the copy stream, copy into it, then decode out of it within ``decoding``."""
        buffer = self.buffers[self.turn]
        self.turn = (self.turn + 1) % len(self.buffers)
        self.ordering.copy_waits(buffer.decoded)
        return buffer

    @contextlib.contextmanager
    def decoding(self, buffer: StagingBuffer):
        """Run the body on the decode stream once the copies issued into ``buffer`` so far landed, and mark the
        buffer free for the copy stream after it."""
        ordering = self.ordering
        ordering.record_copy(buffer.copied)
        with ordering.on_decode_stream():
            ordering.decode_waits(buffer.copied)
            yield
            ordering.record_decode(buffer.decoded)

    def free(self, stream) -> None:
        """Let the buffers go once the copy and decode streams, as they are now, are done (``stream``: the allocation
        stream)."""
        copied, decoded = self.ordering.event(), self.ordering.event()
        self.ordering.record_copy(copied)
        self.ordering.record_decode(decoded)
        self.ordering.stream_waits(stream, copied)
        self.ordering.stream_waits(stream, decoded)
        self.buffers = []


class SlotPool:
    """``count`` slots of ``nbytes`` bytes each on the ordering's device (see the module docstring).

    Args:
        count: number of slots (the window).
        nbytes: bytes per slot (the largest streamed part of a block, as the copier pads it).
        ordering: the dispatch's ``CudaOrdering``/``SyncOrdering``.
        staging: bytes of each staging buffer (0: none).
    """

    # Normal tensors even when a component first runs under ``torch.inference_mode()``: copies write the buffers in
    # the calls that follow, which may run outside it (diffusers' ``__call__`` runs under ``no_grad``).
    @torch.inference_mode(False)
    def __init__(self, count: int, nbytes: int, ordering, staging: int = 0) -> None:
        self.ordering = ordering
        self.nbytes = nbytes
        self.allocation_stream = ordering.compute_stream()
        self.staging = Staging(staging, ordering) if staging else None
        self.slots: list[Slot] = []
        for index in range(count):
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=ordering.device)
            slot = Slot(index, buffer, ordering.event(), ordering.event(), staging=self.staging)
            ordering.record_compute(slot.free)
            self.slots.append(slot)

    @property
    def staging_bytes(self) -> int:
        """Bytes of each staging buffer (0: none)."""
        return 0 if self.staging is None else self.staging.buffers[0].tensor.numel()

    @property
    def held(self) -> bool:
        """Whether the pool holds device memory (between allocation and ``free``)."""
        return bool(self.slots) or self.staging is not None

    @property
    def device_bytes(self) -> int:
        return self.nbytes * len(self.slots) + (0 if self.staging is None else self.staging.device_bytes)

    def free(self) -> None:
        """Give the buffers back once their last copy and last reader are done (stream-ordered, no host wait).
        Safe to call twice."""
        for slot in self.slots:
            self.ordering.stream_waits(self.allocation_stream, slot.ready)
            self.ordering.stream_waits(self.allocation_stream, slot.free)
            slot.holds = None
            slot.views.clear()
        self.slots = []
        if self.staging is not None:
            self.staging.free(self.allocation_stream)
            self.staging = None
