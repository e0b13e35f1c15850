"""A streamed component: its blocks' units, the slots they take turns in, the prefetcher, and residency changes.

Ownership (one ``BlockRing`` per component with ``"layer-window"`` blocks, a DiT or an encoder): the ring owns
its ``SlotPool`` and decides nothing: which blocks keep which head bytes on the device, and how many slots,
come from the plan (``Runtime.set_residency``). The slots and the heads (kept parts, blocks kept whole) are on
the device while the component is active (``enter``) and leave when a component it excludes runs (``leave``),
so components that take turns never hold their slots at the same time. A plan may keep the heads on the
device across those turns (``stays``): the DiT's resident blocks then stay while the encoders stream beside them.
"""

from __future__ import annotations

from .prefetcher import Prefetcher
from .report import TransferStats
from .slots import STAGING_BUFFERS, SlotPool
from .unit import OffloadedUnit


class BlockRing:
    """The streamed blocks of DiT ``name`` (see the module docstring).

    Args:
        name: the DiT's component name.
        units: one unit per streamed block, in declaration order.
        window: number of slots.
        ordering: the dispatch's ``CudaOrdering``/``SyncOrdering``.
        copier: how a block's tail reaches its slot (``sharded_copy.DirectCopy``/``ShardedCopy``).
        stats: transfer counters.
    """

    def __init__(self, name: str, units: list[OffloadedUnit], window: int, ordering, copier, stats: TransferStats) -> None:
        self.name = name
        self.units = units
        self.ordering = ordering
        self.copier = copier
        self.stats = stats
        self.window = window
        self.prefetcher = Prefetcher(name, units, copier, stats)
        self.stays = False  # whether the kept parts stay on the device while components this one excludes run
        # Allocated once here, so that a device too small fails at dispatch; given back until the component runs.
        self.pool = self._allocate(window)
        self.active = True
        self.leave()

    @property
    def paths(self) -> list[str]:
        return [unit.path for unit in self.units]

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot: the largest streamed part of a block (as the copier pads it)."""
        return self.copier.slot_bytes(max((unit.streamed_bytes for unit in self.units), default=0))

    @property
    def slot_count(self) -> int:
        return min(self.window, sum(1 for unit in self.units if unit.streamed_bytes))

    @property
    def staging_bytes(self) -> int:
        """Bytes of each staging buffer that coded blocks are copied through (0 when none is coded)."""
        return max((unit.coded.staging_bytes() for unit in self.units if unit.coded is not None), default=0)

    @property
    def staging_device_bytes(self) -> int:
        """Device memory the staging buffers hold while the component is active."""
        return STAGING_BUFFERS * self.staging_bytes

    @property
    def device_bytes(self) -> int:
        """Device memory the slots and the staging buffers hold while the component is active."""
        return self.slot_bytes * self.slot_count + self.staging_device_bytes

    def _allocate(self, window: int) -> SlotPool:
        return SlotPool(min(window, self.slot_count), self.slot_bytes, self.ordering, self.staging_bytes)

    def set_residency(self, kept: dict[int, int], window: int, stays: bool = False) -> None:
        """From now on keep the first ``kept[i]`` bytes of block ``i`` (all of them: the block stays whole) on the
        device, and stream the rest through ``window`` slots; with ``stays``, the kept parts stay on the device
        while components this one excludes run. Called at a forward boundary; an inactive ring takes its slots and
        kept parts when it next runs."""
        active = self.active
        self.free()
        for index, unit in enumerate(self.units):
            unit.set_kept(kept.get(index, 0))
        self.window = window
        self.stays = stays
        if active:
            self.enter()

    def enter(self) -> None:
        """The component is about to run: its slots and kept parts on the device. Safe to call twice. If that fails
        (out of memory, an interrupt), nothing of it stays on the device and the ring stays inactive."""
        try:
            if not self.pool.held and (self.slot_count or self.staging_bytes):
                self.pool = self._allocate(self.window)
                self.prefetcher.restart(self.pool.slots)
            self.fetch_heads()
        except BaseException:
            self.free()
            self.active = False
            raise
        self.active = True

    def leave(self) -> None:
        """A component this one excludes is about to run: its slots leave the device, and its kept parts unless
        they stay."""
        if self.active:
            self.settle()
            if not self.stays:
                self.drop_heads()
            self.pool.free()
            self.prefetcher.restart([])
            self.active = False

    def fetch_heads(self) -> None:
        """Bring every kept part to the device. Safe to call twice."""
        for unit in self.units:
            copied = unit.fetch_head(staging=self.pool.staging)
            if copied:
                self.stats.add_block(copied, on_demand=False)

    def drop_heads(self) -> None:
        """Let every kept part go. Safe to call twice."""
        for unit in self.units:
            unit.drop_head()

    def settle(self) -> None:
        """Every block's tail back on the host: the running block released, issued loads cancelled."""
        self.prefetcher.settle()

    def forget_contents(self) -> None:
        """Settle, and forget what the slots hold (the host bytes changed, so earlier copies are stale)."""
        self.settle()
        for slot in self.pool.slots:
            slot.holds = None

    def refit(self) -> None:
        """After the units' host bytes (and codes) changed: staging buffers of the new codes' size if it changed, and
        the kept parts back on the device. Only on an active ring."""
        if self.pool.held and self.pool.staging_bytes != self.staging_bytes:
            self.free()
        self.enter()

    @property
    def wire_ratio(self) -> float:
        """Bytes that streaming every block moves per raw byte (below 1 when blocks are coded, ``compression``)."""
        raw = sum(unit.nbytes for unit in self.units)
        moved = sum(unit.nbytes if unit.coded is None else unit.coded.nbytes for unit in self.units)
        return moved / raw if raw else 1.0

    def free(self) -> None:
        """Settle, let the kept parts and the slots go (stream-ordered after their last use). Safe to call twice."""
        self.settle()
        self.drop_heads()
        self.pool.free()
        self.prefetcher.restart([])

    def arm(self, timer) -> None:
        """Time the DiT's forwards with ``timer`` (``calibration.BlockTimer``) until it reports done."""
        self.prefetcher.timer = timer
