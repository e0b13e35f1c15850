"""A lossless code for streaming bf16 weights in fewer bytes: the exponent in 4 bits, sign and mantissa as they are.

A bf16 word is sign (1 bit), exponent (8), mantissa (7). Trained weights use few exponents, so the exponent of
each 16-bit word is replaced by a 4-bit code for the 15 most frequent exponents of the block, and the rest are
listed apart (escapes): 1 byte of sign and mantissa plus half a byte of code per word, about 75% of the raw
bytes. Any 16-bit data round-trips bit for bit, whatever it holds (other dtypes and padding only compress
worse), so a block is coded as one run of words: one table, one decode per block.

``encode`` runs once, on the host, when a block is packed; ``decode`` is plain torch and runs wherever its
inputs are (the device, after the compressed bytes were copied there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CODES = 15  # exponents a block's table holds; code 15 marks an escape
ESCAPE = 15


@dataclass(frozen=True)
class Coded:
    """A run of 16-bit words, coded (see the module docstring).

    Attributes:
        sign_mantissa: ``uint8[n]``: bit 7 the word's sign bit, bits 0-6 its low 7 bits.
        codes: ``uint8[ceil(n / 2)]``: two 4-bit exponent codes per byte, the even word's in the low nibble.
        table: ``uint8[16]``: code -> exponent (entry 15 unused).
        escape_index: ``int64[e]``: the words whose exponent is not in the table.
        escape_exponent: ``uint8[e]``: their exponents.
    """

    sign_mantissa: torch.Tensor
    codes: torch.Tensor
    table: torch.Tensor
    escape_index: torch.Tensor
    escape_exponent: torch.Tensor

    @property
    def words(self) -> int:
        return self.sign_mantissa.numel()

    @property
    def nbytes(self) -> int:
        """Bytes to move: the planes, the table and the escapes (indices as int32 on the wire)."""
        return self.words + self.codes.numel() + 16 + self.escape_exponent.numel() * 5


def encode(words: torch.Tensor) -> Coded:
    """Code a 1-D ``int16`` tensor of words.

    Example:
        >>> w = torch.randn(4096, generator=torch.Generator().manual_seed(0)).mul(0.02).bfloat16().view(torch.int16)
        >>> coded = encode(w)
        >>> torch.equal(decode(coded), w), round(coded.nbytes / (2 * w.numel()), 2)
        (True, 0.75)
    """
    bits = words.to(torch.int32) & 0xFFFF
    exponent = ((bits >> 7) & 0xFF).to(torch.uint8)
    counts = torch.bincount(exponent.to(torch.int64), minlength=256)
    common = torch.argsort(counts, descending=True, stable=True)[:CODES]
    common = common[counts[common] > 0]
    table = torch.zeros(16, dtype=torch.uint8)
    table[: common.numel()] = common.to(torch.uint8)
    code_of = torch.full((256,), ESCAPE, dtype=torch.uint8)
    code_of[common] = torch.arange(common.numel(), dtype=torch.uint8)
    code = code_of[exponent.to(torch.int64)]
    escape_index = torch.nonzero(code == ESCAPE).flatten()
    if code.numel() % 2:
        code = torch.cat([code, code.new_zeros(1)])
    pairs = code.view(-1, 2)
    return Coded(
        sign_mantissa=(((bits >> 8) & 0x80) | (bits & 0x7F)).to(torch.uint8),
        codes=(pairs[:, 0] | (pairs[:, 1] << 4)).contiguous(),
        table=table,
        escape_index=escape_index,
        escape_exponent=exponent[escape_index],
    )


def decode(coded: Coded, out: torch.Tensor | None = None) -> torch.Tensor:
    """The words ``coded`` holds, as a 1-D ``int16`` tensor (written into ``out`` if given), on ``coded``'s device."""
    n = coded.words
    code = torch.stack([coded.codes & 0x0F, coded.codes >> 4], dim=1).flatten()[:n]
    exponent = coded.table[code.to(torch.int64)]
    exponent[coded.escape_index] = coded.escape_exponent
    sm = coded.sign_mantissa.to(torch.int32)
    bits = ((sm & 0x80) << 8) | (exponent.to(torch.int32) << 7) | (sm & 0x7F)
    words = (bits - ((bits & 0x8000) << 1)).to(torch.int16)  # to the signed 16-bit value of the same bits
    if out is None:
        return words
    out.copy_(words)
    return out
