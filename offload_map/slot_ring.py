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
  slot while it has one, else its host buffer. ``load`` rebinds the block leaving the slot to its host views.

Which block goes into which slot, and when, is the prefetcher's business; this class only moves bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .host_storage import PackedTensors
from .report import TransferStats


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
        stats: transfer counters to update.
    """

    def __init__(self, name, blocks: list[PackedTensors], paths: list[str], window: int, ordering, stats: TransferStats) -> None:
        self.name = name
        self.blocks = blocks
        self.paths = paths
        self.ordering = ordering
        self.stats = stats
        self.slot_bytes = max(b.nbytes for b in blocks)
        device = ordering.device
        self.slots = [
            Slot(i, torch.empty(self.slot_bytes, dtype=torch.uint8, device=device), ordering.event(), ordering.event())
            for i in range(window)
        ]

    @property
    def device_bytes(self) -> int:
        return self.slot_bytes * len(self.slots)

    def load(self, slot: Slot, block: int, on_demand: bool = False) -> None:
        """Copy ``block`` into ``slot`` (after the slot's last reader finished) and point the block at it."""
        if slot.block is not None and slot.block != block:
            self.blocks[slot.block].bind_host()
        storage = self.blocks[block]
        with torch.profiler.record_function(f"offload_map::load {self.paths[block]}"):
            self.ordering.copy_waits(slot.free)
            with self.ordering.on_copy_stream():
                slot.buffer[:storage.nbytes].copy_(storage.flat, non_blocking=storage.pinned)
                self.ordering.record_copy(slot.ready)
        slot.block = block
        views = slot.views.get(block)
        if views is None:
            views = slot.views[block] = storage.views(slot.buffer)
        storage.bind(views)
        self.stats.add_block(storage.nbytes, on_demand)

    def before_compute(self, slot: Slot) -> None:
        """Make the compute stream wait for the slot's copy."""
        self.ordering.compute_waits(slot.ready)

    def after_compute(self, slot: Slot) -> None:
        """Mark, on the compute stream, that the block in ``slot`` is done with it."""
        self.ordering.record_compute(slot.free)

    def unbind(self) -> None:
        """Point every block back at its host buffer (the slots' contents become unreachable)."""
        for slot in self.slots:
            if slot.block is not None:
                self.blocks[slot.block].bind_host()
                slot.block = None
            slot.views.clear()
