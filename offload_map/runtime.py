"""The runtime: carries out an ``ExecutionPlan`` and undoes it.

Build order (each step undone by ``restore`` if a later one fails): pack the host storage of pinned
components and streamed blocks (several units at once, on threads: copies and file reads release the
GIL), allocate the slot rings, move the resident tensors to the device, attach the hooks. Tensors on the
meta device are read from their checkpoint (``weights.WeightSource``) into their place. With a
``shared_host.HostCopy``, host units are page-aligned slices of the region this host's ranks share and only
its creator writes them. The runtime decides no policy: placements, window and exclusions all come from
the plan.

Ownership: the ``Runtime`` owns the ordering (copy stream), every ``PackedTensors`` (host buffers), every
``SlotRing`` (device slots and their events) and every ``PinnedComponent`` (device copies of pinned
components). ``restore`` frees them all; ``detach`` only removes the hooks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import torch
import torch.distributed as dist
from tqdm import tqdm

from .device_map import human_bytes
from .hooks import BlockHook, ComponentHook, ComponentGuard, attach, detach
from .host_storage import PackedTensors, home_device, packed_size, trim_host_heap
from .plan import ExecutionPlan, TensorRef, Unit
from .prefetcher import Prefetcher
from .report import SetupTimes, TransferStats
from .shared_host import HostCopy
from .sharded_copy import DirectCopy, ShardedCopy
from .slot_ring import SlotRing
from .streams import ordering_for
from .swapper import PinnedComponent, Swapper

logger = logging.getLogger("offload_map")

# Host units packed at once; page-aligned slices, so each can be page-locked on its own.
PACK_THREADS = min(8, os.cpu_count() or 1)
PAGE = 4096


class Runtime:
    """The live state of one dispatch (see the module docstring)."""

    def __init__(self, plan: ExecutionPlan, pin_memory: bool = True, blocking: bool = False, progress: bool | None = None,
                 source=None, share_host_copy: bool | None = False, shard_copies: bool = False) -> None:
        self.plan = plan
        self.source = source
        self.host_copy: HostCopy | None = None
        self.device = plan.device
        self.pin = pin_memory and self.device.type == "cuda"
        self.blocking = blocking
        self.stats = TransferStats()
        self.setup_times = SetupTimes(threads=PACK_THREADS)
        self.packed: list[PackedTensors] = []
        self.moved: list[tuple[TensorRef, torch.device]] = []
        self.rings: dict[str, SlotRing] = {}
        self.prefetchers: dict[str, Prefetcher] = {}
        self.pinned: dict[str, PinnedComponent] = {}
        self.hooked: list[torch.nn.Module] = []
        self.guards: list[ComponentGuard] = []
        self.ordering = None
        self.built = False
        try:
            self._build(progress, share_host_copy, shard_copies)
        except BaseException:
            self.restore()
            raise
        self.built = True

    @property
    def slot_bytes(self) -> int:
        return sum(r.device_bytes for r in self.rings.values())

    def _build(self, progress: bool | None, share_host_copy: bool | None, shard_copies: bool) -> None:
        plan = self.plan
        self.ordering = ordering_for(self.device)
        host_units = plan.pinned + [u for ring in plan.rings for u in ring.blocks]
        offsets, total = _page_aligned([packed_size(u.tensors) for u in host_units])
        backend = ("nccl" if self.device.type == "cuda" else "gloo") if shard_copies else None
        self.host_copy = HostCopy.open(total, _fingerprint(host_units), share_host_copy, backend)
        self.copier = _copier(self.host_copy)
        region = self.host_copy.flat if self.host_copy is not None else None
        fills = self.host_copy is None or self.host_copy.fills
        try:
            packed = self._pack(host_units, offsets, region, fills, progress)
        except BaseException:
            if self.host_copy is not None:
                try:
                    self.host_copy.ready(ok=False)  # the other ranks fail too, rather than wait
                except Exception:  # noqa: BLE001  (they may be gone already; this rank's own error matters)
                    logger.debug("could not tell the other ranks that packing failed", exc_info=True)
            raise
        if self.host_copy is not None:
            self.host_copy.ready(ok=True)
            if region is not None and not fills:  # the region holds the weights now: let go of our own
                for storage in self.packed:
                    storage.bind_host()
        roles = {c.name: c.role for c in plan.components}
        for unit in plan.pinned:
            name = plan.component_of(unit.path).name
            self.pinned[name] = PinnedComponent(name, roles[name], packed[unit.path], self.device, self.blocking, self.stats)
        for ring in plan.rings:
            self._step(f"allocating {ring.window} slots for {ring.component!r}", self._add_ring, ring, packed)
        self._step("moving resident modules", self._move_resident)
        self.swapper = Swapper(roles, self.pinned, self.rings)
        for comp in plan.components:
            prefetchers = [self.prefetchers[comp.name]] if comp.name in self.prefetchers else []
            self._attach(comp.module, ComponentHook(comp.name, self.device, self.swapper, prefetchers))
            if prefetchers or comp.name in self.pinned:
                self.guards.append(ComponentGuard(comp.name, comp.module))
        for ring, prefetcher in zip(plan.rings, self.prefetchers.values()):
            for index, unit in enumerate(ring.blocks):
                self._attach(unit.module, BlockHook(prefetcher, index, unit.path))

    def _pack(self, host_units: list[Unit], offsets: list[int], region, fills: bool, progress: bool | None) -> dict:
        what = "reading weights into host memory" if self.source else "packing host weights"
        desc = f"offload_map: {what}" if fills else "offload_map: mapping the host copy shared by this host's ranks"
        bar = tqdm(total=sum(u.nbytes for u in host_units), unit="B", unit_scale=True, desc=desc, delay=1.0,
                   disable=progress is False or not host_units)

        def pack(unit: Unit, offset: int) -> PackedTensors:
            if self.device.type == "cuda":  # page-locking registers with the current device; a new thread's is 0
                torch.cuda.set_device(self.device)
            # A rank that does not fill a shared region binds to it only once the filler is done (``ready``):
            # until then its own tensors are the only copy of the weights.
            packed = PackedTensors(unit.tensors, self.pin, None if region is None else region[offset:], fills,
                                   self.source, bind=fills)
            # The unit's original tensors were just freed; return their heap pages now, or RSS holds
            # both copies until packing ends.
            trim_host_heap()
            bar.update(unit.nbytes)
            return packed

        start = time.perf_counter()
        with bar, ThreadPoolExecutor(PACK_THREADS) as pool:
            futures = [pool.submit(pack, unit, offset) for unit, offset in zip(host_units, offsets)]
            error = None
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException as err:  # an interrupt while waiting
                error = err
            for future in futures:
                future.cancel()
            wait(futures)  # units already packing finish: none may bind after a restore began
            packed = {}
            for unit, future in zip(host_units, futures):  # every unit that was packed, so a failure restores them all
                if future.cancelled():
                    continue
                if future.exception() is None:
                    packed[unit.path] = future.result()
                    self.packed.append(packed[unit.path])
                elif error is None:
                    error = future.exception()
            if error is not None:
                raise error
        times = self.setup_times
        times.pack_wall_s = time.perf_counter() - start
        times.fill_s = sum(p.fill_seconds for p in self.packed)
        times.pin_s = sum(p.pin_seconds for p in self.packed)
        return packed

    def _step(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except torch.OutOfMemoryError as err:
            need = sum(u.nbytes for u in self.plan.resident) + sum(min(r.window, len(r.blocks)) * max(u.nbytes for u in r.blocks) for r in self.plan.rings)
            raise torch.OutOfMemoryError(
                f"out of device memory on {self.device} while {what}: this device map needs about "
                f"{human_bytes(need)} for resident weights and slots, plus activations. Give the device more "
                f"free memory, use a smaller window, or place more modules 'cpu-pinned'/'layer-window'. ({err})"
            ) from None

    def _add_ring(self, ring, packed) -> None:
        storages = [packed[u.path] for u in ring.blocks]
        slot_ring = SlotRing(ring.component, storages, [u.path for u in ring.blocks], ring.window, self.ordering, self.stats,
                             self.copier)
        self.rings[ring.component] = slot_ring
        self.prefetchers[ring.component] = Prefetcher(slot_ring)

    def _move_resident(self) -> None:
        for unit in self.plan.resident:
            for ref in unit.tensors:
                tensor = ref.tensor.detach()
                if tensor.device == self.device:
                    continue
                self.moved.append((ref, tensor.device))
                if self.source is not None and self.source.covers(ref):
                    tensor = torch.empty(tensor.shape, dtype=tensor.dtype)  # one tensor-sized host buffer
                    self.source.read_into(ref, tensor)
                ref.bind(tensor.to(self.device))

    def set_residency(self, name: str, resident: frozenset[int], window: int, kept: dict[int, int] | None = None) -> None:
        """Keep blocks ``resident`` of DiT ``name``, and the first ``kept[i]`` bytes of block ``i``, on the device and
        stream the rest through ``window`` slots."""
        prefetcher, ring = self.prefetchers[name], self.rings[name]
        prefetcher.forget_slots()  # the old slots' memory must be free before the new plan allocates
        try:
            self._step(f"re-planning {name!r}", ring.set_resident, resident, window, kept)
        except BaseException:
            ring.set_resident(frozenset(), 1)  # the smallest plan, which dispatch checked fits
            raise
        finally:
            prefetcher.restart()

    def modules_changed(self) -> bool:
        """Whether an offloaded component's parameters changed since the build (a LoRA was loaded or removed)."""
        return any(guard.changed() for guard in self.guards)

    def refresh(self) -> None:
        """Bring the host storage up to date with the module's current weights (see ``OffloadHandle.refresh``)."""
        self.ordering.drain()
        for packed in self.packed:
            packed.sync_from_module()

    def _attach(self, module, hook) -> None:
        attach(module, hook)
        self.hooked.append(module)

    def detach(self) -> None:
        """Remove every hook and point streamed blocks at their host buffers; other weights stay where they are."""
        if self.ordering is not None:
            # Prefetches of the next step may still be in flight; nothing is freed before they land.
            self.ordering.drain()
        while self.hooked:
            detach(self.hooked.pop())
        while self.guards:
            self.guards.pop().remove()
        for ring in self.rings.values():
            ring.unbind()

    def restore(self) -> None:
        """Remove the hooks and put every tensor back on its original device, bit for bit; free everything."""
        self.detach()
        for component in self.pinned.values():
            component.evict()
        while self.packed:
            self.packed.pop().restore(loaded=self.built)
        while self.moved:
            ref, device = self.moved.pop()
            ref.bind(ref.tensor.detach().to(home_device(device, self.built)))
        if self.host_copy is not None:
            self.host_copy.release()
        self.host_copy = None
        self.rings.clear()
        self.prefetchers.clear()
        self.pinned.clear()
        self.ordering = None
        trim_host_heap()


def _copier(host_copy: HostCopy | None):
    if host_copy is None or host_copy.shard_group is None or len(host_copy.ranks) < 2:
        return DirectCopy()
    return ShardedCopy(host_copy.shard_group, host_copy.ranks.index(dist.get_rank()), len(host_copy.ranks))


def _page_aligned(sizes: list[int]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // PAGE) * PAGE
    return offsets, total


def _fingerprint(units: list[Unit]) -> str:
    # Ranks share a host copy only if they would lay it out identically.
    digest = hashlib.sha256()
    for unit in units:
        for ref in unit.tensors:
            tensor = ref.tensor
            digest.update(f"{ref.qualname}:{tuple(tensor.shape)}:{tensor.stride()}:{tensor.dtype};".encode())
    return digest.hexdigest()
