"""A lossless byte-plane code for streaming bf16 blocks in fewer bytes.

A bf16 word is two bytes (little-endian in memory): the low byte holds the exponent's lowest bit and the
mantissa, close to uniformly distributed, so it is stored as it is; the high byte holds the sign and the
exponent's upper 7 bits, and trained weights use few of those. The high byte becomes a 4-bit code: a window
of ``WINDOW`` consecutive exponent values (of the upper 7 bits) per sign, chosen per block where most words
fall, takes codes 0-6 (positive) and 8-14 (negative), code 7 is a zero high byte (zeros, and the padding
between a block's tensors); any other high byte gets code 15 and is listed apart (an escape: its word index
and its byte). That is 1.5 bytes a word, a 512-byte table and 5 bytes an escape: about 75% of the bytes of
trained bf16 weights. Any bytes round-trip, whatever they hold; other dtypes only compress worse, and
``Coded.ratio`` says so for the caller to keep them raw.

A block's planes (``Coded``) are laid out so that the bytes between any two 512-byte boundaries (where the
host buffer's tensors start, ``host_buffer.ALIGN``) are a contiguous range of each plane (``Coded.part``): a
plan that keeps a block's first submodules on the device copies and decodes the two parts apart.

``encode`` runs on the host when a block is packed. ``decode`` runs wherever its inputs are: on a CUDA device,
once a part's planes were copied there, one Triton kernel (``codec_kernel``) writes the part's bytes into a
slot; elsewhere (and without Triton) plain torch does the same in chunks, so its temporaries stay under
about 6 bytes per code byte of ``CHUNK``, whatever the block's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec_kernel import expand

WINDOW = 7  # consecutive exponent values (upper 7 bits) per sign that get a code
ZERO, ESCAPE = 7, 15
SAMPLE = 16  # encode picks the window from every SAMPLE-th word
CHUNK = 1 << 23  # code bytes decoded at once
BOUNDARY = 512  # bytes: a part starts and ends on one (a multiple of two words per code byte)


@dataclass(frozen=True)
class Coded:
    """Words ``first`` to ``first + words`` of a coded run of 16-bit words (see the module docstring); every tensor
    on one device.

    Attributes:
        pairs: ``uint8[256, 2]``: a code byte -> the high bytes of its two words (even word first).
        low: ``uint8[n]``: each word's low byte.
        codes: ``uint8[ceil(n / 2)]``: two 4-bit codes per byte, the even word's in the low nibble.
        escape_index: ``int32[e]``: the words whose high byte has no code, ascending, counted from the run's start.
        escape_high: ``uint8[e]``: their high bytes.
        first: the first word's index in the run.
    """

    pairs: torch.Tensor
    low: torch.Tensor
    codes: torch.Tensor
    escape_index: torch.Tensor
    escape_high: torch.Tensor
    first: int = 0

    @property
    def planes(self) -> tuple[torch.Tensor, ...]:
        return self.pairs, self.low, self.codes, self.escape_index, self.escape_high

    @property
    def words(self) -> int:
        return self.low.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of the planes: what a copy of them moves."""
        return sum(t.numel() * t.element_size() for t in self.planes)

    @property
    def ratio(self) -> float:
        """Coded bytes per raw byte (below 1: it compresses)."""
        return self.nbytes / (2 * self.words) if self.words else 1.0

    def part(self, start: int, stop: int) -> "Coded":
        """The code of bytes ``start:stop`` of the run (multiples of 512): views of each plane.

        Raises:
            ValueError: a bound is not on a 512-byte boundary (the end of the run is one too).
        """
        end = 2 * self.words
        for bound in (start, stop):
            if bound % BOUNDARY and bound != end:
                raise ValueError(f"a coded part starts and ends on a 512-byte boundary, not at byte {bound}")
        lo, hi = start // 2, stop // 2
        index = self.escape_index
        first, last = (int(i) for i in torch.searchsorted(index, torch.tensor([lo, hi], dtype=index.dtype)))
        return Coded(
            self.pairs, self.low[lo:hi], self.codes[lo // 2 : -(-hi // 2)], index[first:last], self.escape_high[first:last], lo
        )

    def like(self, buffer: torch.Tensor) -> "Coded":
        """Planes of this one's sizes carved out of ``buffer`` (``uint8``, at least ``footprint(self)`` bytes): where a
        copy of them goes."""
        views, offset = [], 0
        for plane in self.planes:
            nbytes = plane.numel() * plane.element_size()
            views.append(buffer[offset : offset + nbytes].view(plane.dtype).view(plane.shape))
            offset += -(-nbytes // BOUNDARY) * BOUNDARY
        return Coded(*views, self.first)


def footprint(coded: Coded) -> int:
    """Bytes ``Coded.like`` carves for ``coded``'s planes (each starts on a 512-byte boundary)."""
    return sum(-(-(t.numel() * t.element_size()) // BOUNDARY) * BOUNDARY for t in coded.planes)


def encode(raw: torch.Tensor) -> Coded:
    """Code the bytes ``raw`` (1-D ``uint8`` on the CPU, an even number of them: 16-bit words).

    Example:
        >>> w = torch.randn(4096, generator=torch.Generator().manual_seed(0)).mul(0.02).bfloat16()
        >>> coded = encode(w.view(torch.uint8))
        >>> torch.equal(decode(coded), w.view(torch.uint8)), round(coded.ratio, 2)
        (True, 0.81)
    """
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() % 2:
        raise ValueError(f"encode takes a 1-D uint8 tensor of whole 16-bit words, got {raw.dtype} {tuple(raw.shape)}")
    words = raw.view(-1, 2)
    low, high = words[:, 0], words[:, 1].contiguous()
    magnitude = high & 0x7F
    # The window of WINDOW consecutive magnitudes (both signs together) that holds the most words, from a sample.
    counts = torch.bincount(magnitude[::SAMPLE], minlength=128)
    counts[0] = 0  # a zero high byte has a code of its own
    sums = torch.nn.functional.pad(counts, (0, WINDOW - 1)).unfold(0, WINDOW, 1).sum(dim=1)
    base = int(torch.argmax(sums))
    offset = magnitude - base  # uint8: a magnitude below the window wraps past it
    outside = offset >= WINDOW
    zero = outside & (high == 0)
    escaped = outside & ~zero
    code = (offset | ((high >> 7) << 3)).masked_fill_(zero, ZERO).masked_fill_(escaped, ESCAPE)
    escape_index = torch.nonzero(escaped).flatten().to(torch.int32)
    if code.numel() % 2:
        code = torch.cat([code, code.new_zeros(1)])
    table = torch.zeros(16, dtype=torch.uint8)  # ZERO's entry is 0; ESCAPE's is overwritten by the escapes
    table[:WINDOW] = torch.arange(base, base + WINDOW, dtype=torch.uint8)
    table[8 : 8 + WINDOW] = table[:WINDOW] | 0x80
    values = torch.arange(256)
    pairs = torch.stack([table[values & 0x0F], table[values >> 4]], dim=1)
    return Coded(
        pairs=pairs,
        low=low.clone(),
        codes=code.view(-1, 2)[:, 0] | (code.view(-1, 2)[:, 1] << 4),
        escape_index=escape_index,
        escape_high=high[escape_index.long()].contiguous(),
    )


def decode(coded: Coded, out: torch.Tensor | None = None) -> torch.Tensor:
    """The bytes ``coded`` holds, as 1-D ``uint8`` (written into the start of ``out`` if given), on ``coded``'s
    device, on the current stream."""
    n = coded.words
    if out is None:
        out = torch.empty(2 * n, dtype=torch.uint8, device=coded.low.device)
    if expand is not None and out.is_cuda and n % 2 == 0:
        expand(coded, out)
        return out
    words = out[: 2 * n].view(-1, 2)
    high = words[:, 1]
    words[:, 0] = coded.low
    for first in range(0, coded.codes.numel(), CHUNK):
        codes = coded.codes[first : first + CHUNK]
        pairs = coded.pairs.index_select(0, codes.to(torch.int32)).view(-1)
        stop = min(n, 2 * (first + codes.numel()))
        high[2 * first : stop] = pairs[: stop - 2 * first]
    if coded.escape_index.numel():
        high[coded.escape_index.long() - coded.first] = coded.escape_high
    return out
