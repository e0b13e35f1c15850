"""The device side of ``codec.decode``: one Triton kernel that expands a part's planes into its words.

Each program decodes one group of words (``codec.GROUP``): it gathers each word's code from the group's
bit-planes, ranks the group's escapes with a prefix sum (the group's count in ``starts`` gives the first
one's place in the escape list), looks the other symbols up in the 16-entry table, puts each symbol above the
high byte's raw bits (from the planes after the code's), and writes each word
of the part (the first and last group may reach past it) as one 16-bit store. One launch is all a part
costs the host: the stream waits for nothing.

``expand`` is None where Triton is missing (the CPU build, or a CUDA build without it): ``codec.decode``
then does the same with torch ops, slower but bit for bit the same.
"""

from __future__ import annotations

import torch

# Warps a program runs in: with 8 it decoded 1.02 TB/s of bf16 output on an H200, with 4 (Triton's default) 0.78 and
# with 16 0.96; fp16's wider planes 0.81, 0.50 and 0.75 (340 MB blocks, ``benchmarks/codec_throughput.py --warps 4 8
# 16``, ``benchmarks/results/h200/codec_throughput.jsonl``).
WARPS = 8

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

if triton is not None:

    @triton.jit
    def _expand_kernel(
        codes_ptr,
        low_ptr,
        table_ptr,
        starts_ptr,
        escapes_ptr,
        out_ptr,
        offset,
        skipped,
        n_words,
        BITS: tl.constexpr,
        RAW: tl.constexpr,
        GROUP: tl.constexpr,
    ):
        group = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, GROUP)
        planes = codes_ptr + group * ((BITS + RAW) * GROUP // 8) + lane // 8
        code = tl.zeros([GROUP], dtype=tl.int32)
        for j in tl.static_range(BITS):
            code |= ((tl.load(planes + j * (GROUP // 8)).to(tl.int32) >> (lane % 8)) & 1) << j
        kept = tl.zeros([GROUP], dtype=tl.int32)  # the high byte's lowest RAW bits
        for j in tl.static_range(RAW):
            kept |= ((tl.load(planes + (BITS + j) * (GROUP // 8)).to(tl.int32) >> (lane % 8)) & 1) << j
        escaped = code == (1 << BITS) - 1
        count = escaped.to(tl.int32)
        rank = tl.load(starts_ptr + group) - skipped + tl.cumsum(count, 0) - count
        word = group * GROUP + lane - offset  # counted from the part's first word
        inside = (word >= 0) & (word < n_words)
        symbol = tl.load(table_ptr + code).to(tl.int32)
        symbol = tl.where(escaped, tl.load(escapes_ptr + rank, mask=escaped & inside, other=0).to(tl.int32), symbol)
        high = (symbol << RAW) | kept
        low = tl.load(low_ptr + word, mask=inside, other=0).to(tl.int32)
        tl.store(out_ptr + word, (low | (high << 8)).to(tl.int16), mask=inside)

    def expand(coded, out: torch.Tensor) -> None:
        """Write into ``out`` (``uint8``) the words ``coded`` (a ``codec.Coded``) holds; every tensor on one CUDA
        device."""
        groups, _, width = coded.codes.shape
        if groups:
            _expand_kernel[(groups,)](
                coded.codes,
                coded.low,
                coded.table,
                coded.starts,
                coded.escapes,
                out[: 2 * coded.words].view(torch.int16),
                coded.first - coded.base,
                coded.skipped,
                coded.words,
                BITS=coded.bits,
                RAW=coded.raw_bits,
                GROUP=8 * width,
                num_warps=WARPS,
            )

else:
    expand = None
