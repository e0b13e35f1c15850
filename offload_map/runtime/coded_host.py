"""A streamed block kept coded in host memory (``codec``), copied so and decoded on the device, bit for bit.

With ``compression="lossless"`` every ``"layer-window"`` block that codes to at most ``WORTH`` of its bytes
gets a ``CodedHost`` beside its raw ``HostBuffer``: the raw buffer stays what the module's tensors view on the
host (a refresh writes there, a restore reads from there; it stays page-locked, as coding on the device reads it)
but is no longer copied to slots; the code is, in fewer bytes. Host memory therefore holds both (about 1.71
times the block's bytes), except for a block read from a checkpoint that stores it as it is laid out: its raw
buffer goes once it is coded, and its tensors view the file (``mapped_host``). A block that does not compress (float32 weights, say) keeps streaming raw, and so does
one whose new weights no longer compress after ``refresh()``.

The block's bytes are cut into pieces of ``PIECE`` bytes, each coded on its own (its own table) and stored
as one contiguous run of planes (``codec.Coded.like``'s layout), so a whole piece crosses the link in one
copy. A copy of bytes ``start:stop`` goes piece by piece: the piece's planes are copied into one of the
two buffers of the ring's ``Staging`` on the copy stream, and decoded from there into the target (a slot,
or a kept part's buffer) on the decode stream, while the copy stream goes on with the next piece into the
other buffer (see ``slots.Staging`` for the events). Only a piece cut by ``start`` or ``stop`` (where a
kept part ends) is copied plane by plane, just the part of it that is needed.

Coding runs where the blocks will be decoded: on a CUDA device each piece is coded there (a few
milliseconds) and its planes copied back into the page-locked store; one unit is coded at a time
(``DEVICE_CODING``: about three times its bytes of device memory), and at most ``CODES_ON_DEVICE`` units' codes
wait there until they are written back; on the CPU, with torch's CPU kernels, as many units at once (their
temporaries in host memory).

Ownership (``CodedHost``, one per coded unit, owned by its ``OffloadedUnit``): ``store`` holds every piece's
planes, allocated and page-locked here, read only by copies on the copy stream, replaced by ``encode``
(refresh) and let go by ``release`` only after the host waited for the copy stream (the caller's duty, as
for raw buffers). The staging buffers belong to the ring's ``SlotPool``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch

from ..mapping.memory import CODE_PIECE
from .codec import Coded, decode, encode
from .host_buffer import HostBuffer

PIECE = CODE_PIECE  # raw bytes coded, copied and decoded at once: bounds the staging buffers
WORTH = 0.95  # a block whose code takes more of its raw bytes than this streams raw


def worth_keeping(code):
    """``code`` (a ``CodedHost`` or ``fp8_host.Fp8Host``) if it takes at most ``WORTH`` of its raw bytes, else None
    (its store let go): the unit then streams as it is."""
    if code.ratio <= WORTH:
        return code
    code.release()
    return None


# Units coded at once, from coding to their host store: bounds the device memory (or, coding on the CPU, the host
# temporaries) that dispatch takes while packing threads code, about 0.71 of a unit's bytes each.
CODES_ON_DEVICE = 2


class _DeviceCoding:
    """Packing threads code one unit at a time on the device (``with DEVICE_CODING``: about three times its bytes
    of device memory), and at most ``CODES_ON_DEVICE`` units from coding to their host store (``with
    DEVICE_CODING.room()``). ``waited_s`` sums the seconds threads waited for either, for the setup report
    (``HostStore``). Both are process-wide: an interrupt must never leave either taken."""

    def __init__(self) -> None:
        self._turn = threading.Lock()
        self._room = threading.BoundedSemaphore(CODES_ON_DEVICE)
        self._counted = threading.Lock()
        self.waited_s = 0.0

    def _wait(self, acquire, release) -> None:
        start = time.perf_counter()
        acquire()
        try:
            with self._counted:
                self.waited_s += time.perf_counter() - start
        except BaseException:  # an interrupt here would leave it taken for every later dispatch
            release()
            raise

    def __enter__(self) -> None:
        self._wait(self._turn.acquire, self._turn.release)

    def __exit__(self, *exc) -> None:
        self._turn.release()

    @contextlib.contextmanager
    def room(self) -> Iterator[None]:
        self._wait(self._room.acquire, self._room.release)
        try:
            yield
        finally:
            self._room.release()


DEVICE_CODING = _DeviceCoding()


class CodedHost:
    """The coded pieces of a unit's raw bytes (see the module docstring); ``of`` makes one when it is worth it.

    ``exact``: True, the code gives back the bytes themselves (kept parts are decoded from it too).

    Args:
        raw: the unit's packed bytes (1-D ``uint8`` on the CPU, a multiple of 512 of them; page-locked for a
            fast copy to ``device``).
        device: a CUDA device to code on, or None (the CPU).
        pin: page-lock the code (CUDA only).
    """

    exact = True

    def __init__(self, raw: torch.Tensor, device: torch.device | None = None, pin: bool = False) -> None:
        self.raw_bytes = raw.numel()
        self.device = device
        self.pinned = pin
        self.store: HostBuffer | None = None
        self.pieces: list[Coded] = []  # views of ``store``, one per piece
        self.runs: list[torch.Tensor] = []  # each piece's planes as one run of ``store``
        self._plans: dict[tuple[int, int], list] = {}  # (start, stop) -> ``_plan``'s answer, made once per code
        self.encode(raw)

    @classmethod
    def of(cls, raw: torch.Tensor, device: torch.device | None = None, pin: bool = False) -> "CodedHost | None":
        """A ``CodedHost`` of ``raw``, or None when ``raw`` is empty or its code would not save enough (``WORTH``)."""
        return worth_keeping(cls(raw, device, pin)) if raw.numel() else None

    @property
    def nbytes(self) -> int:
        """Bytes of the code, alignment included (what copying the whole unit moves)."""
        return sum(run.numel() for run in self.runs)

    @property
    def ratio(self) -> float:
        return self.nbytes / self.raw_bytes

    def encode(self, raw: torch.Tensor) -> None:
        """Code ``raw`` anew (at dispatch, and after the weights changed); the old code stays until the new one is
        complete, so a failure leaves the unit as it was. The caller has waited for the copy stream."""
        piece = PIECE  # the code's own grid from here on, whatever the constant later says
        with DEVICE_CODING.room():
            if self.device is None:
                pieces = [encode(raw[a:b]) for a, b in _pieces(0, self.raw_bytes, piece)]
            else:
                with DEVICE_CODING:
                    on_device = raw.to(self.device, non_blocking=raw.is_pinned())
                    pieces = [encode(on_device[a:b]) for a, b in _pieces(0, self.raw_bytes, piece)]
                    del on_device
            self._store(pieces, piece)  # page-locking the store is host work: another unit codes on the device meanwhile
            del pieces  # their memory goes before the room does

    def _store(self, pieces: list[Coded], piece: int) -> None:
        planes = [plane for coded in pieces for plane in coded.planes]
        store = HostBuffer.holding(planes, self.pinned)  # each piece's planes in a row, as ``Coded.like`` carves them
        self.release()
        self.store = store
        starts = [region.offset for region in store.regions[::5]] + [store.nbytes]
        self.runs = [store.flat[a:b] for a, b in zip(starts, starts[1:])]
        self.pieces = [coded.like(run) for coded, run in zip(pieces, self.runs)]
        self._plans = {}
        self.piece = piece
        self._version = object()  # names this code in the staging buffers' caches of plane views

    def release(self) -> None:
        """Let go of the code (after the host waited for the copy stream). Safe to call twice."""
        if self.store is not None:
            self.store.release()
        self.store, self.pieces, self.runs = None, [], []

    def staging_bytes(self) -> int:
        """Bytes of one staging buffer that any piece of this unit (or part of one) fits in."""
        return max(run.numel() for run in self.runs)

    def part_bytes(self, start: int, stop: int) -> int:
        """Bytes a copy of raw bytes ``start:stop`` moves."""
        return sum(run.numel() if part is None else part.nbytes for _, _, run, part in self._plan(start, stop))

    def copy(self, target: torch.Tensor, start: int, stop: int, staging) -> None:
        """Write raw bytes ``start:stop`` into ``target`` (from its offset 0), piece by piece through ``staging``
        (a ``slots.Staging``). Call on the copy stream, after ``target`` is free; the decodes run on the decode
        stream, so the caller records its ``ready`` event there."""
        pinned = self.store.pinned
        for a, b, run, part in self._plan(start, stop):
            buffer = staging.take()
            key = (self._version, a, b)
            planes = buffer.views.get(key)
            if planes is None:
                planes = buffer.views[key] = (self.pieces[a // self.piece] if part is None else part).like(buffer.tensor)
            if part is None:  # the whole piece: one copy
                buffer.tensor[: run.numel()].copy_(run, non_blocking=pinned)
            else:
                for dst, src in zip(planes.planes, part.planes):
                    dst.copy_(src, non_blocking=pinned)
            with staging.decoding(buffer):
                decode(planes, target[a - start : b - start])

    def _plan(self, start: int, stop: int) -> list[tuple[int, int, torch.Tensor, Coded | None]]:
        # (a, b, the piece's run, None for the whole piece or the needed part of it) for each piece in start:stop;
        # a unit loads the same part every step, so this is worked out once.
        plan = self._plans.get((start, stop))
        if plan is None:
            plan = self._plans[(start, stop)] = []
            for a, b in _pieces(start, stop, self.piece):
                index = a // self.piece
                first = index * self.piece
                whole = a == first and b == min(first + self.piece, self.raw_bytes)
                part = None if whole else self.pieces[index].part(a - first, b - first)
                plan.append((a, b, self.runs[index], part))
        return plan


def _pieces(start: int, stop: int, piece: int) -> list[tuple[int, int]]:
    """Bytes ``start:stop`` cut where the pieces' grid (multiples of ``piece`` from 0) cuts them."""
    cuts = [start, *range((start // piece + 1) * piece, stop, piece), stop]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]
