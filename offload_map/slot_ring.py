"""The slot ring: ``window`` device buffers that streamed blocks take turns in.

Ownership contract (one ``SlotRing`` per streamed DiT):

- ``Slot.buffer``: one device ``uint8`` buffer sized for the ring's largest block, allocated once here and
  freed with the ring. Written only by host-to-device copies on the copy stream; read only by the block
  computing in it, on the compute stream.
- ``Slot.ready``: recorded on the copy stream after the copy into the slot; the compute stream waits on it
  before the block runs.
- ``Slot.free``: recorded on the compute stream after the block ran; the copy stream waits on it before
  the next copy overwrites the slot. Nothing allocates, calls ``record_stream`` or blocks the host per block.
- A block's tensors always view a buffer that holds its weights, or will once ``ready`` completes: its
  slot while it has one, its own device buffer while it is resident, else its host buffer. ``load``
  rebinds the block leaving the slot to its host views.
- Blocks the planner keeps on the device, whole (``resident``) or their first ``kept[i]`` bytes (whole
  submodules, at one of ``PackedTensors.split_points``; only the rest streams), each own one device
  buffer in ``resident_buffers``, allocated on the compute stream by ``load_residents`` and dropped by
  ``evict_residents`` when a component the DiT excludes (an encoder) needs the room. A slot then holds
  only the streamed rest of a block, so it is sized for the largest streamed part, not the largest block.

Which block goes into which slot, and when, is the prefetcher's business; this class only moves bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .host_storage import PackedTensors
from .report import TransferStats
from .sharded_copy import DirectCopy


@dataclass
class Slot:
    index: int
    buffer: torch.Tensor
    ready: object
    free: object
    block: int | None = None
    views: dict[int, list[torch.Tensor]] = field(default_factory=dict)


class SlotRing:
    """Device slots for the blocks of one DiT and the copies into them.

    Args:
        name: the DiT's component name (for profiler ranges and messages).
        blocks: the packed host storage of each streamed block, in declaration order.
        paths: each block's module path.
        window: number of slots (<= number of blocks).
        ordering: ``CudaOrdering`` or ``SyncOrdering`` for the target device.
        stats: transfer counters to update (host bytes this rank read).
        copier: how a block reaches its slot (``sharded_copy``): whole, or shared out between ranks.
    """

    def __init__(self, name, blocks: list[PackedTensors], paths: list[str], window: int, ordering, stats: TransferStats,
                 copier=None) -> None:
        self.name = name
        self.copier = copier or DirectCopy()
        self.blocks = blocks
        self.paths = paths
        self.ordering = ordering
        self.stats = stats
        self.kept: dict[int, int] = {}  # block -> bytes kept on the device (its whole size when resident)
        self.resident: frozenset[int] = frozenset()  # blocks kept whole (never loaded); set with ``kept``
        self.resident_buffers: dict[int, torch.Tensor] = {}
        self.slots: list[Slot] = []
        self.slot_bytes = 0
        self.resize(window)

    def streamed_bytes(self, block: int) -> int:
        """Bytes of ``block`` that go through a slot."""
        return self.blocks[block].nbytes - self.kept.get(block, 0)

    @property
    def device_bytes(self) -> int:
        return self.slot_bytes * len(self.slots)

    def resize(self, window: int) -> None:
        """(Re)allocate ``window`` slots sized for the largest streamed part of a block. Call between forwards only."""
        self.unbind_slots()
        if self.ordering.asynchronous and self.slots:
            # In-flight copies into the old slots must land before the allocator hands their memory out.
            torch.cuda.current_stream(self.ordering.device).wait_stream(self.ordering.copy_stream)
        self.slots = []
        streamed = [self.streamed_bytes(i) for i in range(len(self.blocks)) if i not in self.resident]
        self.slot_bytes = self.copier.slot_bytes(max(streamed, default=0))
        count = min(window, len(streamed))
        device = self.ordering.device
        self.slots = [
            Slot(i, torch.empty(self.slot_bytes, dtype=torch.uint8, device=device), self.ordering.event(), self.ordering.event())
            for i in range(count)
        ]

    def set_resident(self, blocks: frozenset[int], window: int, kept: dict[int, int] | None = None) -> None:
        """Keep ``blocks`` whole, and the first ``kept[i]`` bytes of block ``i`` (a split point), in their own device
        buffers from now on, and stream the rest through ``window`` slots."""
        self.unbind_slots()  # while ``kept`` still says which tensors of a block its slot holds
        self.evict_residents()
        self.kept = {i: size for i, size in (kept or {}).items() if size} | {i: self.blocks[i].nbytes for i in blocks}
        self.resident = frozenset(i for i, size in self.kept.items() if size == self.blocks[i].nbytes)
        self.resize(window)
        self.load_residents()

    def load_residents(self) -> None:
        """Give every kept block (part) its device buffer (one copy each, on the compute stream). Safe to call twice."""
        for block in sorted(self.kept.keys() - self.resident_buffers.keys()):
            storage, size = self.blocks[block], self.kept[block]
            buffer = torch.empty(size, dtype=torch.uint8, device=self.ordering.device)
            buffer.copy_(storage.flat[:size], non_blocking=storage.pinned)
            storage.bind(storage.views(buffer, 0, size))
            self.resident_buffers[block] = buffer
            self.stats.add_block(size, on_demand=False)

    def evict_residents(self) -> None:
        """Point kept blocks (parts) back at host memory and drop their device buffers. Safe to call twice."""
        for block in list(self.resident_buffers):
            storage = self.blocks[block]
            storage.bind(storage.host_views[:storage.first_at(self.kept[block])])
            del self.resident_buffers[block]

    def load(self, slot: Slot, block: int, on_demand: bool = False, timed: list | None = None) -> None:
        """Copy the streamed part of ``block`` into ``slot`` (after the slot's last reader finished) and point the
        block at it. With ``timed`` (calibration), append ``(bytes, start mark, end mark)`` of the copy, marked on
        the copy stream."""
        if slot.block is not None and slot.block != block:
            self._tail_to_host(slot.block)
        storage = self.blocks[block]
        kept = self.kept.get(block, 0)
        src = storage.flat[kept:]
        with torch.profiler.record_function(f"offload_map::load {self.paths[block]}"):
            self.ordering.copy_waits(slot.free)
            with self.ordering.on_copy_stream():
                start = self.ordering.stamp() if timed is not None else None
                self.copier(slot.buffer, src, storage.pinned, self.paths[block])
                self.ordering.record_copy(slot.ready)
                if timed is not None:
                    timed.append((src.numel(), start, self.ordering.stamp()))
        slot.block = block
        views = slot.views.get(block)
        if views is None:
            views = slot.views[block] = storage.views(slot.buffer, kept)
        storage.bind(views, storage.first_at(kept))
        self.stats.add_block(self.copier.host_bytes(src.numel()), on_demand)

    def _tail_to_host(self, block: int) -> None:
        storage = self.blocks[block]
        first = storage.first_at(self.kept.get(block, 0))
        storage.bind(storage.host_views[first:], first)

    def before_compute(self, slot: Slot) -> None:
        """Make the compute stream wait for the slot's copy."""
        self.ordering.compute_waits(slot.ready)

    def after_compute(self, slot: Slot) -> None:
        """Mark, on the compute stream, that the block in ``slot`` is done with it."""
        self.ordering.record_compute(slot.free)

    def unbind_slots(self) -> None:
        """Point the blocks in slots back at their host buffers (the slots' contents become unreachable)."""
        for slot in self.slots:
            if slot.block is not None:
                self._tail_to_host(slot.block)
                slot.block = None
            slot.views.clear()

    def unbind(self) -> None:
        """Point every block back at its host buffer and drop the resident blocks' device buffers."""
        self.unbind_slots()
        self.evict_residents()
