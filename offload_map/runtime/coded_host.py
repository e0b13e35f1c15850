"""A streamed block kept coded in host memory (``codec``), copied so and decoded on the device, bit for bit.

With ``compression="lossless"`` every ``"layer-window"`` block that codes to at most ``WORTH`` of its bytes
gets a ``CodedHost`` beside its raw ``HostBuffer``: the raw buffer stays what the module's tensors view on the
host (a refresh writes there, a restore reads from there) but is no longer page-locked or copied; the planes
are, in fewer bytes. A block that does not compress (float32 weights, say) keeps streaming raw.

A copy goes ``PIECE`` raw bytes at a time: the piece's planes are copied into the ring's staging buffer and
decoded from there into the target (a slot, or a kept part's buffer), both on the copy stream, so the next
piece's copy into the same staging buffer is ordered after the decode that reads it, and the target's
``ready`` event (recorded after the last decode) covers the whole block. The staging buffer therefore holds
one piece, whatever the block's size.

Ownership (``CodedHost``, one per coded unit, owned by its ``OffloadedUnit``): ``store`` holds the planes,
allocated and page-locked here, read only by copies on the copy stream, replaced by ``encode`` (refresh) and
let go by ``release`` only after the host waited for the copy stream (the caller's duty, as for raw buffers).
The staging buffer belongs to the ring's ``SlotPool``.
"""

from __future__ import annotations

import torch

from .codec import BOUNDARY, Coded, decode, encode
from .host_buffer import HostBuffer

PIECE = 64 << 20  # raw bytes copied and decoded at once: what bounds the staging buffer
WORTH = 0.95  # a block whose code takes more of its raw bytes than this streams raw
MAX_WORDS = 1 << 31  # escape indices are int32


class CodedHost:
    """The planes of a unit's raw bytes (see the module docstring); ``of`` makes one when it is worth it.

    Args:
        raw: the unit's packed bytes (1-D ``uint8`` on the CPU, a multiple of 512 of them).
    """

    def __init__(self, raw: torch.Tensor) -> None:
        self.raw_bytes = raw.numel()
        self.store: HostBuffer | None = None
        self.coded: Coded | None = None
        self.escapes = 0
        self._parts: dict[tuple[int, int], Coded] = {}
        self.encode(raw)

    @classmethod
    def of(cls, raw: torch.Tensor) -> "CodedHost | None":
        """A ``CodedHost`` of ``raw``, or None when the code would not save enough (``WORTH``) or ``raw`` is empty or
        too large for int32 escape indices."""
        if not raw.numel() or raw.numel() // 2 >= MAX_WORDS:
            return None
        coded = cls(raw)
        return coded if coded.ratio <= WORTH else None

    @property
    def nbytes(self) -> int:
        """Bytes of the planes (what copying the whole unit moves)."""
        return self.coded.nbytes

    @property
    def ratio(self) -> float:
        return self.nbytes / self.raw_bytes

    @property
    def pinned(self) -> bool:
        return self.store.pinned

    def encode(self, raw: torch.Tensor) -> None:
        """Code ``raw`` anew (at dispatch, and after the weights changed); pinned again if it was. The caller has
        waited for the copy stream."""
        pin = self.store is not None and self.store.pinned
        self.release()
        coded = encode(raw)
        store = HostBuffer(list(coded.planes))
        for index, plane in enumerate(coded.planes):
            store.write(index, plane)
        self.store, self.coded = store, Coded(*store.views(store.flat))
        self.escapes = coded.escape_index.numel()
        self._parts = {}
        if pin:
            self.pin()

    def pin(self) -> None:
        self.store.pin()

    def release(self) -> None:
        """Let go of the planes (after the host waited for the copy stream). Safe to call twice."""
        if self.store is not None:
            self.store.release()
        self.store = self.coded = None

    def staging_bytes(self) -> int:
        """Bytes of staging that any piece of this unit needs (from any 512-byte boundary on): a piece's planes at
        their largest, each on a 512-byte boundary."""
        words = min(PIECE, self.raw_bytes) // 2
        escapes = min(self.escapes, words)
        return sum(-(-nbytes // BOUNDARY) * BOUNDARY for nbytes in (512, words, -(-words // 2), 4 * escapes, escapes))

    def part_bytes(self, start: int, stop: int) -> int:
        """Bytes a copy of raw bytes ``start:stop`` moves."""
        return sum(self._part(a, b).nbytes for a, b in _pieces(start, stop))

    def copy(self, target: torch.Tensor, start: int, stop: int, staging: torch.Tensor) -> None:
        """Write raw bytes ``start:stop`` into ``target`` (from its offset 0): each piece's planes copied into
        ``staging`` and decoded from there. Call on the copy stream, after ``target`` and ``staging`` are free."""
        for a, b in _pieces(start, stop):
            part = self._part(a, b)
            planes = part.like(staging)
            for dst, src in zip(planes.planes, part.planes):
                dst.copy_(src, non_blocking=self.store.pinned)
            decode(planes, target[a - start : b - start])

    def _part(self, start: int, stop: int) -> Coded:
        part = self._parts.get((start, stop))
        if part is None:
            part = self._parts[(start, stop)] = self.coded.part(start, stop)
        return part


def _pieces(start: int, stop: int) -> list[tuple[int, int]]:
    return [(a, min(a + PIECE, stop)) for a in range(start, stop, PIECE)]
