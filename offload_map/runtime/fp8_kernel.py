"""The device side of ``fp8_host.upcast``: one Triton kernel, ``out[r, c] = q[r, c] * scale[r]`` rounded to ``out``'s dtype.

Each program handles ``BLOCK`` columns of one row of a row-major weight: it reads the row's scale once and the
float8 bytes, widens them to float32, multiplies by the scale and stores the result in the weight's dtype, with
no temporaries (the torch path makes two float32 copies a few rows at a time). Rows are a grid axis, so no
element's row is found by a (64-bit, slow) division. Float8 e4m3 conversions need an sm_89 or newer GPU;
``upcast`` is None elsewhere (and without Triton), and ``fp8_host.upcast`` then uses torch: the same float32
product, rounded the same way, so both paths give the same bits.
"""

from __future__ import annotations

import functools

import torch

from .codec_kernel import triton

BLOCK = 1024  # columns per program

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _upcast_kernel(q_ptr, scale_ptr, out_ptr, columns, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        column = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = column < columns
        index = row * columns + column
        q = tl.load(q_ptr + index, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        scale = tl.load(scale_ptr + row)
        tl.store(out_ptr + index, (q * scale).to(out_ptr.dtype.element_ty), mask=mask)

    @functools.cache
    def _converts_float8(index: int | None) -> bool:
        # Asked once per device, not on every upcast (a load runs one per linear weight).
        return torch.cuda.get_device_capability(index) >= (8, 9)

    def upcast(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> bool:
        """Launch the kernel (``q`` float8 ``[rows, columns]``, ``scale`` float32 ``[rows]``, ``out`` contiguous, all
        on one CUDA device); False, launching nothing, where this GPU lacks float8 conversions."""
        if not _converts_float8(out.device.index):
            return False
        rows, columns = q.shape
        if q.numel():
            grid = (rows, triton.cdiv(columns, BLOCK))
            _upcast_kernel[grid](q.view(torch.uint8), scale, out, columns, BLOCK=BLOCK)
        return True

else:
    upcast = None
