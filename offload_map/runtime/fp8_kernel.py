"""The device side of ``fp8_host.upcast``: one Triton kernel, ``out[r, c] = q[r, c] * scale[r]`` rounded to ``out``'s dtype.

Each program handles ``BLOCK`` elements of one row-major weight: it reads the float8 bytes, widens them to
float32, multiplies by the row's scale and stores the result in the weight's dtype, with no temporaries (the
torch path makes two float32 copies a few rows at a time). Float8 e4m3 conversions need an sm_89 or newer GPU;
``upcast`` is None elsewhere (and without Triton), and ``fp8_host.upcast`` then uses torch: the same float32
product, rounded the same way, so both paths give the same bits.
"""

from __future__ import annotations

import functools

import torch

from .codec_kernel import triton

BLOCK = 4096  # elements per program

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _upcast_kernel(q_ptr, scale_ptr, out_ptr, n, columns, BLOCK: tl.constexpr):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = index < n
        q = tl.load(q_ptr + index, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        scale = tl.load(scale_ptr + index // columns, mask=mask, other=0.0)
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
        n = q.numel()
        if n:
            _upcast_kernel[(triton.cdiv(n, BLOCK),)](q.view(torch.uint8), scale, out, n, q.shape[1], BLOCK=BLOCK)
        return True

else:
    upcast = None
