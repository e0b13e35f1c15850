"""A streamed block's linear weights kept in float8 in host memory (``compression="fp8"``), upcast into the slot.

Opt-in and **lossy**: each ``nn.Linear`` weight of a ``"layer-window"`` block (2-D, bf16 or fp16) is stored as
float8 e4m3 with one float32 scale per output channel (its largest magnitude maps to 448, e4m3's largest
value), about half its bytes; every other tensor (biases, norms, buffers) is stored as it is. A copy moves the
float8 bytes; on the device each weight is upcast, ``q * scale`` in float32 rounded to the weight's dtype, into
the slot, where the block finds its usual bf16 layout. Outputs differ from the resident run (the benchmarks
report by how much); a block with no such weight, or where float8 would save little (``coded_host.WORTH``:
small tensors lose most of it to alignment), streams raw and exact.

The store holds, tensor after tensor, either the float8 bytes and the scales or the raw bytes, each on a
512-byte boundary, so the tensors of any part of the block are one contiguous run of it. The tensors are
grouped once, from the first, into chunks of at most ``CHUNK`` store bytes (a larger tensor is a chunk alone);
a copy goes chunk by chunk (a part that starts or ends inside one takes the tensors it needs of it, never more
than the staging buffers hold) through the ring's staging buffers exactly as coded pieces do
(``slots.Staging``): copied on the copy stream, upcast on the decode stream, the whole chunk by one launch of
``fp8_kernel`` per dtype of its weights (on a GPU without float8 conversions, and on the CPU, tensor by tensor with torch).

Only streamed bytes are float8: a part a plan keeps on the device (a head) is copied as it is, so what stays on
the device, and what ``refresh()`` reads back from there, is the exact weight.

Ownership (``Fp8Host``, one per unit, owned by its ``OffloadedUnit``): as ``coded_host.CodedHost``'s store.
The kernel's tables (a few hundred bytes of device memory per part a unit loads; the first takes a block of the
caching allocator on the decode stream) are made at the part's first load, on the decode stream, which alone
reads them: dropped with the store (``encode``, ``release``), their memory serves later work on that stream only
after what the stream had queued, the decodes that read them included.
"""

from __future__ import annotations

import torch

from ..mapping.memory import CODE_PIECE
from . import fp8_kernel
from .coded_host import DEVICE_CODING, worth_keeping
from .host_buffer import HostBuffer, Region

E4M3_MAX = 448.0
CHUNK = CODE_PIECE  # store bytes copied at once (a larger tensor alone): bounds the staging buffers
ROWS_AT_ONCE = 1 << 23  # elements upcast at once on the CPU path: bounds its float32 temporaries


class Fp8Host:
    """The float8 store of a unit (see the module docstring). ``exact``: False, kept parts are copied raw.

    Args:
        regions: the raw host buffer's tensor regions (``HostBuffer.regions``).
        raw: the raw bytes (1-D ``uint8`` on the CPU; page-locked for a fast copy to ``device``).
        quantize: per tensor, whether it is a linear weight to store in float8.
        device: a CUDA device to quantize on, or None (the CPU).
        pin: page-lock the store (CUDA only).
    """

    exact = False

    def __init__(
        self, regions: list[Region], raw: torch.Tensor, quantize: list[bool], device: torch.device | None, pin: bool
    ) -> None:
        self.regions = regions
        self.raw_bytes = raw.numel()
        self.quantize = [q and _quantizable(r) for q, r in zip(quantize, regions)]
        self.device = device
        self.pinned = pin
        self.store: HostBuffer | None = None
        self.items: list[int] = []  # per tensor, the index of its first item in the store
        self.grid: list[tuple[int, int]] = []  # the chunks: runs of whole tensors [first, last)
        self._cuts: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (start, stop) -> ``_chunks``'s answer
        self._tables: dict[tuple[int, int, int], list] = {}  # (first, last, start) -> the kernel's launches
        self.encode(raw)

    @classmethod
    def of(cls, regions, raw, quantize, device=None, pin=False) -> "Fp8Host | None":
        """An ``Fp8Host``, or None when the unit holds no linear weight to store in float8 or float8 would not save
        enough (``WORTH``; small tensors lose most of it to alignment): such a unit streams exact."""
        if not any(q and _quantizable(r) for q, r in zip(quantize, regions)):
            return None
        return worth_keeping(cls(regions, raw, quantize, device, pin))

    @property
    def nbytes(self) -> int:
        """Bytes of the store (what copying the whole unit moves)."""
        return self.store.nbytes

    @property
    def ratio(self) -> float:
        return self.nbytes / self.raw_bytes

    def encode(self, raw: torch.Tensor) -> None:
        """Quantize ``raw`` anew (at dispatch, and after the weights changed); the old store stays until the new one
        is complete, so a failure leaves the unit as it was. The caller has waited for the copy stream."""
        with DEVICE_CODING.room():
            if self.device is None:
                items, firsts = self._items(raw)
            else:
                with DEVICE_CODING:
                    items, firsts = self._items(raw.to(self.device, non_blocking=raw.is_pinned()))
            store = HostBuffer.holding(items, self.pinned)
            del items  # their device memory goes before the room does
        self.release()
        self.store, self.items = store, firsts
        self.grid, self._cuts, self._tables = self._group(), {}, {}

    def _items(self, raw: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
        items, firsts = [], []
        for region, quantize in zip(self.regions, self.quantize):
            firsts.append(len(items))
            if quantize:
                items += quantized(region.view(raw))
            else:
                items.append(raw[region.offset : region.offset + region.span])
        return items, firsts

    def _group(self) -> list[tuple[int, int]]:
        chunks, begin = [], 0
        for index in range(len(self.regions)):
            if index > begin and self._run(begin, index + 1)[1] - self._run(begin, index + 1)[0] > CHUNK:
                chunks.append((begin, index))
                begin = index
        if begin < len(self.regions):
            chunks.append((begin, len(self.regions)))
        return chunks

    def release(self) -> None:
        """Let go of the store (after the host waited for the copy stream). Safe to call twice."""
        if self.store is not None:
            self.store.release()
        self.store, self._tables = None, {}

    def staging_bytes(self) -> int:
        """Bytes of one staging buffer that any chunk of this unit (or part of one) fits in."""
        return max((b - a for a, b in (self._run(*chunk) for chunk in self.grid)), default=0)

    def part_bytes(self, start: int, stop: int) -> int:
        """Bytes a copy of raw bytes ``start:stop`` (tensor boundaries) moves."""
        return sum(b - a for a, b in (self._run(*chunk) for chunk in self._chunks(start, stop)))

    def copy(self, target: torch.Tensor, start: int, stop: int, staging) -> None:
        """Write the tensors stored in raw bytes ``start:stop`` into ``target`` (which holds those bytes from its
        offset 0), chunk by chunk through ``staging``. Call on the copy stream, after ``target`` is free."""
        kernel = target.is_cuda and fp8_kernel.expand is not None and fp8_kernel.converts_float8(target.device.index)
        for first, last in self._chunks(start, stop):
            a, b = self._run(first, last)
            buffer = staging.take()
            buffer.tensor[: b - a].copy_(self.store.flat[a:b], non_blocking=self.store.pinned)
            with staging.decoding(buffer):
                if kernel:
                    for dtype, table, programs, aligned in self._launches(first, last, start, target.device):
                        fp8_kernel.expand(buffer.tensor, target, dtype, table, programs, aligned)
                else:
                    for index in range(first, last):
                        self._expand(index, buffer.tensor, a, target, start)

    def tables(self, first: int, last: int, start: int) -> list[tuple[torch.dtype, list[tuple[int, ...]], int, bool]]:
        """The kernel's launches for tensors ``[first, last)`` staged as one chunk, written into a target that holds
        raw bytes from ``start`` on: ``(dtype of the weights, table rows, programs, aligned)`` each, one per dtype
        of the weights (the tensors stored as they are go with the first); see ``fp8_kernel``.

        Example (a linear weight of 2 rows of 4 columns, stored in float8 with its scales, then its bias as it is):
            >>> from offload_map.runtime.host_buffer import layout
            >>> regions, nbytes = layout([torch.empty(2, 4, dtype=torch.bfloat16), torch.empty(2, dtype=torch.bfloat16)])
            >>> host = Fp8Host(regions, torch.ones(nbytes, dtype=torch.uint8), [True, False], None, False)
            >>> host.tables(0, 2, 0)
            [(torch.bfloat16, [(0, 0, 2, 4, 128, 0, 2), (1024, 512, 0, 4, 0, 2, 1)], 3, False)]
        """
        a = self._run(first, last)[0]
        groups: dict[torch.dtype, list[tuple[int, int, int, int, int]]] = {}
        kept = []
        for index in range(first, last):
            region, item = self.regions[index], self.store.regions[self.items[index]]
            if self.quantize[index]:
                scales = self.store.regions[self.items[index] + 1].offset - a
                rows, columns = region.shape
                offset = (region.offset - start) // region.dtype.itemsize
                groups.setdefault(region.dtype, []).append((item.offset - a, offset, rows, columns, scales // 4))
            elif region.span:
                kept.append((item.offset - a, region.offset - start, 0, region.span, 0))
        launches = []
        for dtype, rows in groups.items() or [(torch.uint8, [])]:
            table, programs = [], 0
            for row in rows + kept:
                count = min(fp8_kernel.tiles(row[2], row[3]), fp8_kernel.PROGRAMS)
                table.append((*row, programs, count))
                programs += count
            kept = []
            # The kernel is promised aligned offsets: the store's and the slot's tensors start on 512-byte boundaries.
            unaligned = [row for row in table if row[0] % fp8_kernel.ALIGN or row[1] % fp8_kernel.ALIGN]
            if unaligned:
                raise RuntimeError(
                    f"fp8 store: tensors {first}-{last} are not all on {fp8_kernel.ALIGN}-byte boundaries (offsets "
                    f"{[row[:2] for row in unaligned]}); the host buffer's layout should give 512: please report this"
                )
            if table:
                launches.append((dtype, table, programs, all(row[3] % fp8_kernel.ALIGN == 0 for row in table)))
        return launches

    def _launches(self, first: int, last: int, start: int, device: torch.device) -> list:
        # ``tables`` with each table on ``device``, made at the part's first load on the current stream, the decode
        # stream (see Ownership). From page-locked memory, so that the host does not wait: the pinned allocator keeps
        # the host copy until the device copy is done.
        key = (first, last, start)
        launches = self._tables.get(key)
        if launches is None:
            launches = self._tables[key] = [
                (dtype, torch.tensor(table, dtype=torch.int64).pin_memory().to(device, non_blocking=True), *rest)
                for dtype, table, *rest in self.tables(first, last, start)
            ]
        return launches

    def _expand(self, index: int, staged: torch.Tensor, base: int, target: torch.Tensor, start: int) -> None:
        # Tensor ``index`` from the staged store bytes (which begin at store byte ``base``) into its place in target.
        region = self.regions[index]
        item = self.store.regions[self.items[index]]
        if not self.quantize[index]:
            target[region.offset - start : region.offset - start + region.span].copy_(item.raw(staged, base))
            return
        q = item.view(staged, base).view(torch.float8_e4m3fn).view(region.shape)
        scale = self.store.regions[self.items[index] + 1].view(staged, base)
        upcast(q, scale, region.view(target, start))

    def _chunks(self, start: int, stop: int) -> list[tuple[int, int]]:
        # The grid's chunks cut to the tensors stored in raw bytes start:stop (the same part every step: once).
        chunks = self._cuts.get((start, stop))
        if chunks is None:
            first = sum(r.offset < start for r in self.regions)
            last = sum(r.offset < stop for r in self.regions)
            cut = [(max(a, first), min(b, last)) for a, b in self.grid]
            chunks = self._cuts[(start, stop)] = [(a, b) for a, b in cut if a < b]
        return chunks

    def _run(self, first: int, last: int) -> tuple[int, int]:
        # Store bytes holding tensors [first, last).
        regions = self.store.regions
        end = regions[self.items[last]].offset if last < len(self.items) else self.store.nbytes
        return regions[self.items[first]].offset, end


def _quantizable(region: Region) -> bool:
    rows, columns = (region.shape + (0, 0))[:2] if len(region.shape) == 2 else (0, 0)
    contiguous = region.stride == (columns, 1)
    return region.dtype in (torch.bfloat16, torch.float16) and rows > 0 and columns > 0 and contiguous


def quantized(weight: torch.Tensor) -> list[torch.Tensor]:
    """``[float8 bytes, float32 scales]`` of a 2-D weight, one scale per output channel (row).

    Example:
        >>> w = torch.tensor([[1.0, -2.0], [0.0, 0.0]], dtype=torch.bfloat16)
        >>> q, scale = quantized(w)
        >>> scale.tolist(), q.view(torch.float8_e4m3fn).float().tolist()
        ([0.004464285913854837, 1.0], [224.0, -448.0, 0.0, 0.0])
    """
    amax = weight.float().abs().amax(dim=1)
    # A product, not a division: torch's CUDA kernels divide by a scalar as a multiplication by its reciprocal and
    # its CPU kernels do not, so a quotient could differ by an ulp between the two; the product cannot.
    scale = torch.where(amax > 0, amax * (1 / E4M3_MAX), torch.ones_like(amax))
    q = (weight.float() / scale[:, None]).to(torch.float8_e4m3fn)
    return [q.view(torch.uint8).flatten(), scale]


def upcast(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out = q * scale`` (per row), computed in float32 and rounded to ``out``'s dtype, with torch a few rows at
    a time (``fp8_kernel`` does the same for a whole chunk on a recent GPU)."""
    rows = max(1, ROWS_AT_ONCE // max(1, q.shape[1]))
    for first in range(0, q.shape[0], rows):
        block = q[first : first + rows].to(torch.float32).mul_(scale[first : first + rows, None])
        out[first : first + rows].copy_(block)
