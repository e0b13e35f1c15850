"""The device side of ``codec.decode``: one Triton kernel that expands a part's code and low bytes into words.

Each program handles ``BLOCK`` code bytes, i.e. twice as many words: it reads a code byte and the two low
bytes beside it, looks the two high bytes up in the part's 512-byte table (``Coded.pairs``, read as 256
16-bit entries: the even word's high byte in the low half) and writes the two words as one 32-bit store. A
part always holds a whole number of 512-byte runs (``codec.BOUNDARY``), so word pairs never straddle its
end and every plane and output starts aligned. A second kernel, on the same stream, then writes each
escape's high byte (both launches are all a part costs the host: the stream waits for nothing).

``expand`` is None where Triton is missing (the CPU build, or a CUDA build without it): ``codec.decode``
then does the same with torch ops, slower but bit for bit the same.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

BLOCK = 4096  # code bytes per program
ESCAPE_BLOCK = 1024  # escapes per program

if triton is not None:

    @triton.jit
    def _expand_kernel(codes_ptr, low_ptr, pairs_ptr, out_ptr, n_codes, BLOCK: tl.constexpr):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = index < n_codes
        code = tl.load(codes_ptr + index, mask=mask, other=0).to(tl.int32)
        low = tl.load(low_ptr + index, mask=mask, other=0).to(tl.int32) & 0xFFFF  # low bytes of both words
        high = tl.load(pairs_ptr + code).to(tl.int32) & 0xFFFF  # high bytes of both words
        word_pair = (low & 0xFF) | ((high & 0xFF) << 8) | ((low & 0xFF00) << 8) | ((high & 0xFF00) << 16)
        tl.store(out_ptr + index, word_pair, mask=mask)

    @triton.jit
    def _patch_kernel(index_ptr, high_ptr, out_ptr, first, n_escapes, BLOCK: tl.constexpr):
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = index < n_escapes
        word = tl.load(index_ptr + index, mask=mask, other=0).to(tl.int64) - first
        tl.store(out_ptr + 2 * word + 1, tl.load(high_ptr + index, mask=mask, other=0), mask=mask)

    def expand(coded, out: torch.Tensor) -> None:
        """Write into ``out`` (``uint8``) the words ``coded`` (a ``codec.Coded`` of an even number of words) holds,
        escapes included; every tensor on one CUDA device."""
        n_codes = coded.low.numel() // 2
        if n_codes:
            _expand_kernel[(triton.cdiv(n_codes, BLOCK),)](
                coded.codes,
                coded.low.view(torch.int16),
                coded.pairs.view(torch.int16),
                out[: 4 * n_codes].view(torch.int32),
                n_codes,
                BLOCK=BLOCK,
            )
        n_escapes = coded.escape_index.numel()
        if n_escapes:
            _patch_kernel[(triton.cdiv(n_escapes, ESCAPE_BLOCK),)](
                coded.escape_index, coded.escape_high, out, coded.first, n_escapes, BLOCK=ESCAPE_BLOCK
            )

else:
    expand = None
