"""Counters the runtime keeps, and the report a dispatch handle prints."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..mapping.device_map import DeviceMap
from ..mapping.placement import Placement
from ..mapping.sizes import human_bytes


@dataclass
class TransferStats:
    """Host-to-device traffic since dispatch. Updated by the slot rings and the pinned swapper."""

    bytes_h2d: int = 0
    block_loads: int = 0
    on_demand_loads: int = 0
    component_loads: int = 0
    component_bytes: int = 0  # of ``bytes_h2d``: what components (and streamed ones' weights outside blocks) moved whole
    component_evictions: int = 0

    def add_block(self, nbytes: int, on_demand: bool) -> None:
        self.bytes_h2d += nbytes
        self.block_loads += 1
        self.on_demand_loads += on_demand

    def add_component(self, nbytes: int) -> None:
        self.bytes_h2d += nbytes
        self.component_bytes += nbytes
        self.component_loads += 1


@dataclass
class SetupTimes:
    """Where dispatch time went: packing host storage (wall), and, summed over the packing threads, writing
    the weights into it (copies or checkpoint reads), coding streamed blocks (``compression``; of which waiting
    for the device, which codes one unit at a time) and page-locking."""

    pack_wall_s: float = 0.0
    fill_s: float = 0.0
    pin_s: float = 0.0
    threads: int = 1
    code_s: float = 0.0
    code_wait_s: float = 0.0

    def __str__(self) -> str:
        waiting = f" ({self.code_wait_s:.2f} s of it waiting for the device)" if self.code_wait_s >= 0.005 else ""
        coding = f"coding blocks {self.code_s:.2f} s{waiting}, " if self.code_s else ""
        return (
            f"host storage {self.pack_wall_s:.2f} s wall ({self.threads} threads: writing weights {self.fill_s:.2f} s, "
            f"{coding}page-locking {self.pin_s:.2f} s, summed over threads)"
        )


@dataclass(frozen=True)
class CodedTotals:
    """Blocks kept coded (``compression``): ``blocks`` of the streamed components' blocks that compression applies
    to, ``coded`` of them coded (the rest do not compress), their bytes raw and coded, and ``others``, the
    streamed components' blocks it leaves as they are (paths set to None or not named), and ``mapped``, the coded
    blocks held in host memory only as their code (``mapped_host``). A plan that keeps a block on the device keeps
    its code: the kept part is decoded from it."""

    blocks: int
    coded: int
    raw_bytes: int
    coded_bytes: int
    others: int = 0
    mapped: int = 0

    def __str__(self) -> str:
        ratio = self.coded_bytes / self.raw_bytes if self.raw_bytes else 1.0
        raw = self.blocks - self.coded
        return (
            f"{self.coded} of the {self.blocks} blocks compression applies to, {human_bytes(self.raw_bytes)} -> "
            f"{human_bytes(self.coded_bytes)} ({ratio:.3f} of the bytes)"
            + (f"; {raw} stay raw (they do not compress)" if raw else "")
            + (
                f"; {self.mapped} held only coded (at rest, their tensors view files: their checkpoint or the offload folder)"
                if self.mapped
                else ""
            )
            + (f"; {self.others} other blocks of streamed components as they are" if self.others else "")
        )


@dataclass
class Report:
    """What a dispatch placed where, what it moved, and the device memory it saw.

    ``peak_device_bytes`` is the allocator's peak since dispatch on a CUDA target (None on the CPU);
    ``slot_bytes`` is the device memory held by the slot rings; ``setup_seconds`` the time dispatch took;
    ``coded`` what compression coded (None without compression); ``host_bytes`` the host memory holding weights,
    raw and coded (``Runtime.host_bytes``).
    """

    device: str
    strategy: str
    bytes_by_placement: dict[Placement, int]
    slot_bytes: int
    setup_seconds: float
    stats: TransferStats = field(default_factory=TransferStats)
    peak_device_bytes: int | None = None
    setup_times: SetupTimes = field(default_factory=SetupTimes)
    coded: CodedTotals | None = None
    host_bytes: tuple[int, int] = (0, 0)

    @classmethod
    def start(cls, dmap: DeviceMap, slot_bytes: int, setup_seconds: float, stats: TransferStats, times: SetupTimes) -> "Report":
        return cls(dmap.device, dmap.strategy, dmap.bytes_by_placement(), slot_bytes, setup_seconds, stats, setup_times=times)

    def __str__(self) -> str:
        placed = ", ".join(f"{p.value} {human_bytes(n)}" for p, n in self.bytes_by_placement.items())
        s = self.stats
        lines = [
            f"offload_map report ({self.strategy} -> {self.device})",
            f"  placed:    {placed}",
            f"  slots:     {human_bytes(self.slot_bytes)} of device memory for streamed blocks",
            f"  setup:     {self.setup_seconds:.2f} s, of which {self.setup_times}",
            f"  moved:     {human_bytes(s.bytes_h2d)} host->device in {s.block_loads} block loads "
            f"({s.on_demand_loads} on demand) and {s.component_loads} component loads ({human_bytes(s.component_bytes)}); "
            f"{s.component_evictions} evictions",
        ]
        raw, coded = self.host_bytes
        lines.append(
            f"  host:      {human_bytes(raw + coded)} of host memory holds weights"
            + (f" ({human_bytes(raw)} raw, {human_bytes(coded)} coded)" if coded else "")
        )
        if self.coded is not None:
            lines.append(f"  coded:     {self.coded}")
        if self.peak_device_bytes is not None:
            lines.append(f"  peak:      {human_bytes(self.peak_device_bytes)} device memory allocated since dispatch")
        return "\n".join(lines)
