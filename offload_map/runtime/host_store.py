"""Host storage for a dispatch: every pinned component and streamed block packed into its host buffer.

Packing runs on ``PACK_THREADS`` threads at once (copies, checkpoint reads and page-locking release the GIL);
each tensor is rebound to its unit's host buffer as soon as it is written there, so the original storage is freed
as packing goes and host memory holds about one copy of the weights throughout: what a unit has written but not
yet given back to the OS is held twice (its bytes, or ``PACK_RUN`` of them for a unit larger than that), so units
holding at most ``PACK_IN_FLIGHT`` bytes twice together are packed at once (8 threads packing Flux's 0.68 GB
blocks held 5 GB more than the weights). Tensors on the meta device are read from their checkpoint
(``loading.weights.WeightSource``) straight into place, held once.

Ranks of one host may share one host copy (``shared_host.HostCopy``): units are then page-aligned slices of
the shared region, only its creator fills them, and the others bind to them once it is filled.

With ``compression`` each streamed block is coded too (``coded_host.CodedHost`` for ``"lossless"``,
``fp8_host.Fp8Host`` for ``"fp8"``, on the target device) right after it is filled and page-locked; the code is
page-locked as well, and is what its copies read. A block coded losslessly whose tensors view files (read from a
checkpoint that stores them as the model lays them out, or left so by ``from_pretrained``) then lets its raw
buffer go: at rest its tensors view the file (``mapped_host.MappedHost``), so host memory holds its code only.
The pages packing read of such files leave the process once it ends (``file_views.release_read_pages``). With an
offload folder, a block built in memory is held so too, its raw bytes written to a file there
(``MappedHost.written``).

Ownership: ``HostStore`` owns every ``HostBuffer`` (allocated or sliced, filled and page-locked here; a unit held
only as its code lets its own go in ``OffloadedUnit.map_to``), each unit's code (``CodedHost``/``Fp8Host``), and
the ``HostCopy``. ``restore`` gives every tensor its own storage
again and releases them all; the caller has made the host wait for the copy (and decode) streams, the only
readers of host buffers and codes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager

import torch
from tqdm import tqdm

from ..collect.tensors import is_dtensor
from ..mapping.placement import Placement
from ..planning.bind import ExecutionPlan, Unit
from .coded_host import DEVICE_CODING, CodedHost
from .file_views import FileViews, release_read_pages
from .fp8_host import Fp8Host
from .host_buffer import HostBuffer, layout, storage_span, trim_host_heap
from .mapped_host import MappedHost
from .report import SetupTimes
from .shared_host import HostCopy
from .unit import OffloadedUnit

logger = logging.getLogger("offload_map")

# Host units packed at once; page-aligned slices of a shared region, so each can be page-locked on its own.
PACK_THREADS = min(8, os.cpu_count() or 1)
# Bytes of units packed at once (a larger unit packs alone): each is held twice until its tensors are rebound.
PACK_IN_FLIGHT = 3 * 2**29
# A unit's tensors are rebound to its buffer one by one as they are written, and the heap pages their originals
# leave are returned every PACK_RUN bytes: a unit larger than that (a whole pinned component: T5-XXL, a 12B DiT)
# holds PACK_RUN bytes twice at a time, not all of its bytes (measured on the H200, Flux's 23.8 GB transformer
# packed whole took host RSS from 35 to 59 GB). Blocks (Flux's are 0.4-0.7 GB) are smaller: they return their
# pages once, when packed, as before (each return walks the whole heap).
PACK_RUN = 2**30
PAGE = 4096


class HostStore:
    """Pack the host units of ``plan`` (see the module docstring).

    Args:
        plan: the bound plan; its pinned components and streamed blocks are packed.
        ordering: the dispatch's ordering (handed to the units).
        pin: page-lock the buffers (CUDA only).
        source: a ``WeightSource`` for tensors on the meta device, or None.
        share_host_copy: see ``dispatch_pipeline``.
        shard_backend: make a process group of this host's ranks for sharded loads (``"nccl"``/``"gloo"``), or None.
        progress: show a progress bar (None: when packing takes over a second).
        folder: ``offload_folder``: where blocks coded losslessly that view no file rest (or None).

    Attributes:
        units: unit path -> ``OffloadedUnit``, every tensor bound to its host buffer.
        host_copy: the ``HostCopy`` shared with this host's ranks, or None.
        times: where packing time went.
    """

    def __init__(
        self,
        plan: ExecutionPlan,
        ordering,
        pin: bool,
        source,
        share_host_copy: bool | None,
        shard_backend: str | None,
        progress: bool | None,
        folder: "os.PathLike | None" = None,
    ) -> None:
        self.ordering = ordering
        self.folder = folder
        self._folder_failed = False  # a write there failed: the blocks after it keep their raw buffers
        self._folder_lock = threading.Lock()  # one warning, whichever packing threads fail
        self.pin = pin
        self.source = source
        self.kinds = plan.compression  # streamed block -> how it is kept (``compression``)
        self.files = FileViews()  # the process's file mappings, which weights from ``from_pretrained`` view
        self.units: dict[str, OffloadedUnit] = {}
        self.times = SetupTimes(threads=PACK_THREADS)
        self.loaded = False
        host_units = plan.pinned + [u for ring in plan.rings for u in ring.blocks]
        offsets, total = _page_aligned([layout([r.local for r in u.tensors])[1] for u in host_units])
        self.host_copy = HostCopy.open(total, _fingerprint(host_units), share_host_copy, shard_backend)
        region = self.host_copy.flat if self.host_copy is not None else None
        fills = self.host_copy is None or self.host_copy.fills
        try:
            self._pack(host_units, offsets, region, fills, plan.device, progress)
            self.source = None  # its checkpoints' mappings live on only in the views of blocks held coded
        except BaseException:
            self.restore()  # every unit packed so far, so the model is as it was
            if self.host_copy is not None:
                try:
                    self.host_copy.ready(ok=False)  # the other ranks fail too, rather than wait
                except Exception:  # noqa: BLE001  (they may be gone already; this rank's own error matters)
                    logger.debug("could not tell the other ranks that packing failed", exc_info=True)
                self.release_shared()
            raise
        if self.host_copy is not None:
            self.host_copy.ready(ok=True)
            if not fills:  # the shared region holds the weights now: let go of our own
                for unit in self.units.values():
                    unit.bind_host()
        self.loaded = True

    @property
    def buffers(self) -> "list[HostBuffer | MappedHost]":
        """Every unit's host storage."""
        return [unit.host for unit in self.units.values()]

    def _pack(
        self, host_units: list[Unit], offsets: list[int], region, fills: bool, device: torch.device, progress: bool | None
    ) -> None:
        what = "reading weights into host memory" if self.source else "packing host weights"
        desc = f"offload_map: {what}" if fills else "offload_map: mapping the host copy shared by this host's ranks"
        bar = tqdm(
            total=sum(u.nbytes for u in host_units),
            unit="B",
            unit_scale=True,
            desc=desc,
            delay=1.0,
            disable=progress is False or not host_units,
        )
        fill_s, pin_s, code_s = [], [], []
        waited = DEVICE_CODING.waited_s
        in_flight = _InFlight(PACK_IN_FLIGHT)
        failed: list[BaseException] = []  # coding failures (their units are packed, and restored with the others)
        read: list[torch.Tensor] = []  # weights packed from views of their files
        packed_lock = threading.Lock()

        def pack(unit: Unit, offset: int) -> None:
            # Only tensors copied from memory are held twice (read from a checkpoint, they are on the meta device;
            # a rank that does not fill a shared region allocates nothing).
            twice = sum(r.nbytes for r in unit.tensors if not (self.source and self.source.covers(r))) if fills else 0
            # Weights that ``from_pretrained`` left viewing their files: a block held only as its code keeps them at
            # rest, so they are taken before binding lets them go; the pages packing reads of them leave after it.
            originals = self._file_views(unit) if fills and "lossless" in self.kinds.values() else None
            with in_flight.hold(min(twice, PACK_RUN)):
                packed = pack_unit(unit, offset)
            if unit.path in self.kinds and not in_flight.stopped:
                # Outside the hold: the originals went when the unit was bound and the code is kept (its temporaries
                # bounded by ``DEVICE_CODING.room``); inside, it took most of a coded unit's packing time and kept
                # other units from starting.
                start = time.perf_counter()
                try:
                    packed.coded = self._code(unit, packed.host, device if device.type == "cuda" else None)
                    mapped = None
                    if isinstance(packed.coded, CodedHost):
                        mapped = self._mapped(unit, originals, packed.host) or self._written(packed.host)
                    if mapped is not None:
                        packed.map_to(mapped)
                        trim_host_heap()
                except BaseException as err:
                    failed.append(err)
                    in_flight.stop()
                code_s.append(time.perf_counter() - start)
            read.extend(t for t in originals or () if t is not None)
            bar.update(unit.nbytes)

        def pack_unit(unit: Unit, offset: int) -> OffloadedUnit:
            if device.type == "cuda":  # page-locking registers with the current device; a new thread's is 0
                torch.cuda.set_device(device)
            start = time.perf_counter()
            buffer = HostBuffer([r.local for r in unit.tensors], None if region is None else region[offset:])
            kept = buffer.nbytes if unit.placement is Placement.CPU_PINNED else 0
            packed = OffloadedUnit(unit.path, unit.tensors, buffer, self.ordering, kept=kept)
            with packed_lock:  # before a tensor is rebound: a restore must find it, even if packing is interrupted twice
                self.units[unit.path] = packed
            if fills:
                self._fill(packed)
            filled = time.perf_counter()
            if self.pin:
                buffer.pin()
            pinned = time.perf_counter()
            fill_s.append(filled - start)
            pin_s.append(pinned - filled)
            # A rank that does not fill a shared region binds to it only once the filler is done (``ready``):
            # until then its own tensors are the only copy of the weights.
            if fills:
                packed.bind_host()  # again, once pinned: torch's pinned allocator, the fallback, moves the buffer
                # The unit's original tensors were just freed; return their heap pages now, or RSS holds
                # both copies until packing ends.
                trim_host_heap()
            return packed

        start = time.perf_counter()
        with bar, ThreadPoolExecutor(PACK_THREADS) as pool:
            futures = [pool.submit(pack, unit, offset) for unit, offset in zip(host_units, offsets)]
            error = None
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException as err:  # an interrupt while waiting
                error = err
            in_flight.stop()  # units waiting for their turn give up, as those not started are cancelled
            for future in futures:
                future.cancel()
            wait(futures)  # units already packing finish: none may bind after a restore began
            for future in futures:
                failure = None if future.cancelled() else future.exception()
                if error is None and failure is not None and not isinstance(failure, _Stopped):
                    error = failure
            self.units = {u.path: self.units[u.path] for u in host_units if u.path in self.units}  # the pipeline's order
            if error is None and failed:
                error = failed[0]
            if error is not None:
                raise error
        # The pages packing read stay mapped while any view of their file lives (a block held only as its code, say):
        # they leave now, once, as a later read would map its neighbours again.
        release_read_pages(read)
        self.times.pack_wall_s = time.perf_counter() - start
        self.times.fill_s, self.times.pin_s, self.times.code_s = sum(fill_s), sum(pin_s), sum(code_s)
        self.times.code_wait_s = DEVICE_CODING.waited_s - waited

    def _fill(self, packed: OffloadedUnit) -> None:
        # Write each tensor into the unit's buffer (or read it there from its checkpoint) and point it there at once,
        # so that its original goes as packing moves on (``PACK_RUN``). A restore puts back the tensors rebound so
        # far, bit for bit; the others never moved.
        packed.bound = True
        written = 0
        for index, ref in enumerate(packed.refs):
            if self.source is not None and self.source.covers(ref):
                self.source.read_into(ref, packed.host.view(index))
            else:
                packed.host.write(index, ref.local)
                written += ref.nbytes
            ref.bind(packed.host_views[index])
            if written >= PACK_RUN:
                trim_host_heap()
                written = 0

    def _code(self, unit: Unit, buffer: HostBuffer, device: torch.device | None) -> "CodedHost | Fp8Host | None":
        # The unit's bytes as ``compression`` stores them, or None where that saves nothing.
        if self.kinds[unit.path] == "fp8":
            linear = [_is_linear_weight(ref) for ref in unit.tensors]
            return Fp8Host.of(buffer.regions, buffer.flat, linear, device, self.pin)
        return CodedHost.of(buffer.flat, device, self.pin)

    def _file_views(self, unit: Unit) -> list[torch.Tensor | None]:
        # Each tensor as it is where it views a private file mapping (``from_pretrained``'s), else None.
        viewed = [not is_dtensor(ref.tensor) and self.files.viewed(ref.local) for ref in unit.tensors]
        return [ref.local.detach() if view else None for ref, view in zip(unit.tensors, viewed)]

    def _mapped(self, unit: Unit, originals: list | None, buffer: HostBuffer) -> MappedHost | None:
        # For a unit coded losslessly (``CodedHost``), the ``MappedHost`` its tensors view at rest: per tensor a view
        # of a file (of its checkpoint, read from one that stores it as the model lays it out; or the tensor itself
        # where it viewed a file before packing, lent), else a copy of its own (a LoRA's tensors beside the file's
        # weights). None where no tensor views a file: the unit keeps its raw buffer. A shared region holds the raw
        # bytes for every rank.
        if self.host_copy is not None:
            return None
        views, lent = [], []
        for index, ref in enumerate(unit.tensors):
            original = originals[index] if originals else None
            read = self.source is not None and self.source.covers(ref)
            views.append(self.source.mapped(ref) if read else original)
            lent.append(not read and original is not None)
        if all(view is None for view in views):
            return None
        return MappedHost([v if v is not None else _copy(buffer, i) for i, v in enumerate(views)], self.pin, lent)

    def _written(self, buffer: HostBuffer) -> MappedHost | None:
        # A coded unit that views no file rests in one of the offload folder (or keeps its raw buffer: no folder,
        # or a write there failed, after which the others do not try, with one warning).
        if self.folder is None or self._folder_failed:
            return None
        try:
            return MappedHost.written(buffer, self.folder)
        except OSError as err:
            with self._folder_lock:
                first, self._folder_failed = not self._folder_failed, True
            if first:
                logger.warning(
                    "offload_map: cannot write to offload_folder %s (%s); the blocks not written there keep their "
                    "raw bytes in host memory",
                    self.folder,
                    err,
                )
            return None

    def restore(self) -> None:
        """Give every tensor its own storage on its original device again, bit for bit, and release the buffers and
        the shared region. Tensors read from a checkpoint stay on the CPU if loading finished, else go back to
        the meta device. Safe to call twice."""
        error = None
        while self.units:
            unit = next(reversed(self.units.values()))  # taken off once restored: an interrupt leaves it for a retry
            try:
                unit.restore(self.loaded)
                unit.host.release()
                unit.drop_code()
            except Exception as err:  # the others are restored still; the first error is raised after them
                error = error or err
            self.units.popitem()
        if self.host_copy is not None:
            self.host_copy.close()
        trim_host_heap()
        if error is not None:
            raise error

    def release_shared(self) -> None:
        """Let go of the region shared with this host's ranks and this dispatch's process groups (after ``restore``)."""
        if self.host_copy is not None:
            self.host_copy.release()
            self.host_copy = None


class _Stopped(Exception):
    """A unit gave up waiting for its turn to pack: packing stopped (another unit failed, or an interrupt)."""


class _InFlight:
    """Host bytes of the units being packed: ``hold(n)`` waits until ``n`` more fit within ``limit`` (or nothing else
    is held, so that a unit larger than the limit still packs, alone; ``hold(0)`` never waits); after ``stop()``, or
    a failure while holding, a unit still waiting raises ``_Stopped`` instead."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.stopped = False
        self._changed = threading.Condition()

    def stop(self) -> None:
        with self._changed:
            self.stopped = True
            self._changed.notify_all()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self.stopped or not self.held or not nbytes or self.held + nbytes <= self.limit)
            if self.stopped:
                raise _Stopped
            self.held += nbytes
        try:
            yield
        except BaseException:
            self.stop()  # before the room is given back: no unit waiting starts after a failure
            raise
        finally:
            with self._changed:
                self.held -= nbytes
                self._changed.notify_all()


def _copy(buffer: HostBuffer, index: int) -> torch.Tensor:
    # Tensor ``index`` of ``buffer`` in memory of its own, laid out as there (so the unit's layout is unchanged).
    region = buffer.regions[index]
    copy = torch.empty_strided(region.shape, region.stride, dtype=region.dtype)
    storage_span(copy).copy_(region.raw(buffer.flat))
    return copy


def _is_linear_weight(ref) -> bool:
    return any(isinstance(module, torch.nn.Linear) and name == "weight" for module, name, _ in ref.slots())


def _page_aligned(sizes: list[int]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // PAGE) * PAGE
    return offsets, total


def _fingerprint(units: list[Unit]) -> str:
    # Ranks share a host copy only if they would lay it out identically and hold the same bytes: a DTensor sharded
    # over the mesh holds another shard on each rank (its coordinate on the sharded mesh dimensions tells which).
    digest = hashlib.sha256()
    for unit in units:
        for ref in unit.tensors:
            tensor = ref.local
            digest.update(f"{ref.qualname}:{tuple(tensor.shape)}:{tensor.stride()}:{tensor.dtype};".encode())
            if is_dtensor(ref.tensor):
                coordinate = ref.tensor.device_mesh.get_coordinate() or []
                shard = [c for c, placement in zip(coordinate, ref.tensor.placements) if not placement.is_replicate()]
                digest.update(f"shard{shard};".encode())
    return digest.hexdigest()
