"""A lossless byte-plane code for streaming bf16 and fp16 blocks in fewer bytes.

A 16-bit float word is two bytes (little-endian in memory): the low byte holds mantissa bits (and bf16's
exponent's lowest bit), close to uniformly distributed, so it is stored as it is; the high byte holds the sign
and most of the exponent, and trained weights use few exponents. The high byte's lowest ``raw_bits`` bits (0 to
3: fp16 keeps two mantissa bits there) are stored as they are too, and the rest of it, its symbol, becomes a code
of ``bits`` bits (1 to 4): the ``2**bits - 1`` most common symbols (in a sample) each get a code, and the last
code is an escape, whose symbol follows in the escape list, in word order. Both widths are chosen per run, for
the fewest bytes.

On N(0, 0.02) weights, as our benchmarks build: bf16, 3 bits cover 95% of the words, 11.4 bits a word, about 71%
of the bytes (4 bits would cover 99.98% but cost 12 bits, 75%); fp16, 2 raw bits and a 4-bit code, about 88%.
Any bytes round-trip, whatever they hold; other dtypes compress worse, and ``Coded.ratio`` says so for the
caller to keep them raw.

Layout, chosen so that any range of words decodes on its own, in parallel. Words are taken in groups of
``GROUP``. Each group's codes are ``bits`` bit-planes of ``GROUP / 8`` bytes (plane j holds bit j of each
word's code, word i in bit ``i % 8`` of byte ``i // 8``), then ``raw_bits`` planes of the raw bits, stored
group after group; ``starts`` gives, per
group, how many escapes come before it. A group's words therefore find their escapes by counting escape codes
within the group, and a part of the run (``Coded.part``, bytes between two 512-byte boundaries, where the host
buffer's tensors start, ``host_buffer.ALIGN``) is a contiguous range of each plane: the groups it touches,
their escapes, and its own low bytes. A plan that keeps a block's first submodules on the device copies and
decodes the two parts apart.

``encode`` runs where the run is, when a block is packed. ``decode`` runs wherever its inputs are: on a CUDA
device, once a part's planes were copied there, one Triton kernel (``codec_kernel``) writes the part's bytes
into a slot; elsewhere (and without Triton) plain torch does the same, ``CHUNK`` groups at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec_kernel import expand

GROUP = 4096  # words that share one count of the escapes before them; a power of two (a Triton block)
MAX_BITS = 4  # the table has 2**MAX_BITS entries
MAX_RAW = 3  # of the high byte's bits, at most this many lowest ones are stored as they are
SAMPLE = 16  # encode picks the table and the width from every SAMPLE-th word
CHUNK = 256  # groups decoded at once by torch: bounds its temporaries (a few bytes a word of those groups)
BOUNDARY = 512  # bytes: a part starts and ends on one


@dataclass(frozen=True)
class Coded:
    """Words ``first`` to ``first + words`` of a coded run of 16-bit words (see the module docstring); every tensor
    on one device. A whole run has ``first == base == skipped == 0``; ``part`` makes the others.

    Attributes:
        table: ``uint8[16]``: a code -> its symbol (the escape code's entry is unused).
        low: ``uint8[n]``: each word's low byte.
        codes: ``uint8[groups, bits + raw_bits, GROUP / 8]``: each group's bit-planes, the code's then the raw bits'.
        starts: ``int32[groups]``: escapes in the run before each group.
        escapes: ``uint8[e]``: the escaped words' symbols, in word order, from the first group's on.
        first: the first word's index in the run.
        base: the first group's first word's index in the run (``first`` rounded down to a group).
        skipped: escapes in the run before the first group (what ``starts`` counts that ``escapes`` lacks).
        raw_bits: the high byte's lowest bits stored as they are; its symbol is the rest (``high >> raw_bits``).
    """

    table: torch.Tensor
    low: torch.Tensor
    codes: torch.Tensor
    starts: torch.Tensor
    escapes: torch.Tensor
    first: int = 0
    base: int = 0
    skipped: int = 0
    raw_bits: int = 0

    @property
    def planes(self) -> tuple[torch.Tensor, ...]:
        return self.table, self.low, self.codes, self.starts, self.escapes

    @property
    def words(self) -> int:
        return self.low.numel()

    @property
    def bits(self) -> int:
        """Bits of each word's code."""
        return self.codes.shape[1] - self.raw_bits

    @property
    def nbytes(self) -> int:
        """Bytes of the planes: what a copy of them moves."""
        return sum(t.numel() * t.element_size() for t in self.planes)

    @property
    def ratio(self) -> float:
        """Coded bytes per raw byte (below 1: it compresses)."""
        return self.nbytes / (2 * self.words) if self.words else 1.0

    def part(self, start: int, stop: int) -> "Coded":
        """The code of bytes ``start:stop`` of a whole run (multiples of 512, or the run's end): views of each
        plane, on the run's device (read there once, for the escapes before the part).

        Raises:
            ValueError: a bound is not on a 512-byte boundary (the end of the run is one too), or the range is not
                within the run.
        """
        end = 2 * self.words
        if not 0 <= start <= stop <= end:
            raise ValueError(f"bytes {start}:{stop} are not a range within the run's {end} bytes")
        for bound in (start, stop):
            if bound % BOUNDARY and bound != end:
                raise ValueError(f"a coded part starts and ends on a 512-byte boundary, not at byte {bound}")
        group = self.codes.shape[2] * 8
        lo, hi = start // 2, stop // 2
        first_group, stop_group = lo // group, -(-hi // group) if hi > lo else lo // group

        def escapes_before(g: int) -> int:
            return int(self.starts[g]) if g < self.starts.numel() else self.escapes.numel()

        skipped, last = escapes_before(first_group), escapes_before(stop_group)
        return Coded(
            self.table,
            self.low[lo:hi],
            self.codes[first_group:stop_group],
            self.starts[first_group:stop_group],
            self.escapes[skipped:last],
            lo,
            first_group * group,
            skipped,
            self.raw_bits,
        )

    def like(self, buffer: torch.Tensor) -> "Coded":
        """Planes of this one's sizes carved out of ``buffer`` (``uint8``, at least ``footprint(self)`` bytes): where a
        copy of them goes."""
        views, offset = [], 0
        for plane, span in zip(self.planes, _spans(self)):
            views.append(buffer[offset : offset + plane.numel() * plane.element_size()].view(plane.dtype).view(plane.shape))
            offset += span
        return Coded(*views, self.first, self.base, self.skipped, self.raw_bits)


def _spans(coded: Coded) -> list[int]:
    # Bytes each plane takes in ``Coded.like``'s layout: its own, rounded up so that the next starts on a boundary.
    return [-(-(t.numel() * t.element_size()) // BOUNDARY) * BOUNDARY for t in coded.planes]


def footprint(coded: Coded) -> int:
    """Bytes ``Coded.like`` carves for ``coded``'s planes (each starts on a 512-byte boundary)."""
    return sum(_spans(coded))


def encode(raw: torch.Tensor) -> Coded:
    """Code the bytes ``raw`` (1-D ``uint8``, an even number of them: 16-bit words), on ``raw``'s device.

    Example:
        >>> w = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)).mul(0.02).bfloat16()
        >>> coded = encode(w.view(torch.uint8))
        >>> torch.equal(decode(coded), w.view(torch.uint8)), coded.bits, coded.raw_bits, round(coded.ratio, 2)
        (True, 3, 0, 0.71)
        >>> coded = encode(w.half().view(torch.uint8))
        >>> coded.bits, coded.raw_bits, round(coded.ratio, 2)
        (4, 2, 0.88)
    """
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() % 2:
        raise ValueError(f"encode takes a 1-D uint8 tensor of whole 16-bit words, got {raw.dtype} {tuple(raw.shape)}")
    words = raw.view(-1, 2)
    low, high = words[:, 0], words[:, 1]
    n = high.numel()
    groups = -(-n // GROUP)
    # Each pair of widths' bytes, estimated from the sample's symbols, most common first (ties: fewer raw bits,
    # then fewer code bits). One histogram of the sampled high bytes serves every width: a symbol without its
    # ``raw_bits`` lowest bits counts ``2**raw_bits`` neighbouring high bytes. Counted on ``raw``'s device (the GPU
    # when coding there): 256 counts cross to the host, not the sample (a sixteenth of the words).
    histogram = torch.bincount(high[::SAMPLE], minlength=256).cpu()
    sampled = -(-n // SAMPLE)
    best = None
    for raw_bits in range(MAX_RAW + 1):
        counts, order = torch.sort(histogram.view(-1, 2**raw_bits).sum(1), descending=True, stable=True)
        share = counts.cumsum(0).double() / max(1, sampled)
        for bits in range(1, MAX_BITS + 1):
            size = groups * (bits + raw_bits) * GROUP / 8 + n * (1 - float(share[2**bits - 2]))
            if best is None or size < best[0]:
                best = size, bits, raw_bits, order
    _, bits, raw_bits, order = best
    order = order.to(raw.device)
    escape = 2**bits - 1
    table = torch.zeros(2**MAX_BITS, dtype=torch.uint8, device=raw.device)
    table[:escape] = order[:escape].to(torch.uint8)
    code_of = torch.full((256,), escape, dtype=torch.uint8, device=raw.device)
    code_of[order[:escape]] = torch.arange(escape, dtype=torch.uint8, device=raw.device)
    symbol = high >> raw_bits

    def grouped(values: torch.Tensor) -> torch.Tensor:  # padded to whole groups, 8 words a row
        return torch.nn.functional.pad(values, (0, groups * GROUP - n)).view(groups, GROUP // 8, 8)

    code = grouped(code_of.index_select(0, symbol.to(torch.int32)))
    escaped = code == escape  # the padding's code is 0, never the escape (which is at least 1)
    per_group = escaped.view(groups, GROUP).sum(dim=1, dtype=torch.int32)
    kept = grouped(high & (2**raw_bits - 1)) if raw_bits else None
    shifts = torch.arange(8, dtype=torch.uint8, device=raw.device)
    planes = [
        ((values >> j) & 1).bitwise_left_shift(shifts).sum(dim=2, dtype=torch.uint8)
        for values, width in ((code, bits), (kept, raw_bits))
        for j in range(width)
    ]
    return Coded(
        table=table,
        low=low.clone(),
        codes=torch.stack(planes, dim=1),
        starts=(per_group.cumsum(0, dtype=torch.int32) - per_group),
        escapes=symbol[escaped.view(-1)[:n]],
        raw_bits=raw_bits,
    )


def decode(coded: Coded, out: torch.Tensor | None = None) -> torch.Tensor:
    """The bytes ``coded`` holds, as 1-D ``uint8`` (written into the start of ``out`` if given), on ``coded``'s
    device, on the current stream."""
    n = coded.words
    if out is None:
        out = torch.empty(2 * n, dtype=torch.uint8, device=coded.low.device)
    if expand is not None and out.is_cuda:
        expand(coded, out)
        return out
    words = out[: 2 * n].view(-1, 2)
    words[:, 0] = coded.low
    groups, _, width = coded.codes.shape
    group, bits = 8 * width, coded.bits
    shifts = torch.arange(8, dtype=torch.uint8, device=out.device)

    def gathered(planes: torch.Tensor) -> torch.Tensor:  # bit j of each word from plane j, in word order
        values = torch.zeros(planes.shape[0], width, 8, dtype=torch.uint8, device=out.device)
        for j in range(planes.shape[1]):
            values |= ((planes[:, j, :, None] >> shifts) & 1) << j
        return values.view(-1)

    for g in range(0, groups, CHUNK):
        planes = coded.codes[g : g + CHUNK]
        code = gathered(planes[:, :bits])
        symbol = coded.table.index_select(0, code.to(torch.int32))
        escaped = code == 2**bits - 1
        first = int(coded.starts[g]) - coded.skipped
        symbol[escaped] = coded.escapes[first : first + int(escaped.sum())]
        high = symbol << coded.raw_bits | gathered(planes[:, bits:])
        # Words g * group on, counted from the part's first word: the first group may start before it.
        lo = coded.base + g * group - coded.first
        keep = slice(max(0, -lo), min(high.numel(), n - lo))
        words[lo + keep.start : lo + keep.stop, 1] = high[keep]
    return out
