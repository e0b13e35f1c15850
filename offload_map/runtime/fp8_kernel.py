"""The device side of ``fp8_host``: one Triton kernel that expands a whole staged chunk of a float8 store.

A chunk holds a run of a block's tensors: float8 linear weights with their scales, and tensors stored as they
are (biases, norms). The kernel writes all of them into the slot in one launch, ``out[r, c] = q[r, c] *
scale[r]`` rounded to ``out``'s dtype for a weight and a byte copy for the rest, so a block costs the host one
launch a chunk (per dtype of its weights), not one launch or copy a tensor: 26 to 42 of those a block of
SD3.5-medium, which a host-bound model pays on every block (on an H200 its fp8 step took 0.132 s against 0.081 s
raw issued tensor by tensor; by chunks, 0.060 s against 0.081 s before this kernel's accesses were promised
aligned (see ``ALIGN``) and 0.058 s against 0.081 s since, each raw step in the same device call).

The chunk's tensors are described by a table (``fp8_host.Fp8Host`` builds it, once per part it loads): one row
of ``COLUMNS`` int64 per tensor: its byte offset in the staged chunk; its offset in the slot (for a weight, in
elements of ``out``; else in bytes of ``target``); its rows (0: a byte copy); its columns (a byte copy: its
bytes); the float32 offset of its scales in the staged chunk; its first program; and how many programs it gets
(at most ``PROGRAMS``: each loops over its tensor's tiles). A program finds its tensor by a binary search of
the first programs; it reads a weight's row scale once per tile and finds each tile's row by one scalar
division, never one per element.

Float8 e4m3 conversions need an sm_89 or newer GPU; ``expand`` is None without Triton and ``converts_float8`` says
whether a device has them: elsewhere ``fp8_host`` upcasts tensor by tensor with torch (the same float32 product,
rounded the same way, so both give the same bits).
"""

from __future__ import annotations

import functools

import torch

from .codec_kernel import triton

BLOCK = 1024  # a weight's columns per tile
RAW_BLOCK = 4 * BLOCK  # bytes per tile of a byte copy
PROGRAMS = 2048  # most programs one tensor gets: one weight of a chunk alone fills an H200's SMs
COLUMNS = 7  # int64 per row of the table
# Offsets in the table are multiples of this (tensors start on 512-byte boundaries in the store and the slot), and
# so are a launch's widths where ``aligned``: promised to the compiler, the accesses go 8 and 16 bytes at a time,
# as the one-weight kernel's did (compiled for sm_90, checked by ``ptxas -v`` once: 32 registers a thread; with widths
# not promised, a byte at a time, 64 by Triton 3.9's code and 124 by 3.2-3.6's; 123 without any promise; the PTX's
# accesses are tested).
ALIGN = 16


def tiles(rows: int, width: int) -> int:
    """Tiles of a table row: a weight's rows times its column blocks, or a byte copy's blocks of ``RAW_BLOCK``."""
    return rows * -(-width // BLOCK) if rows else -(-width // RAW_BLOCK)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _chunk_kernel(
        staged_ptr,
        scales_ptr,
        target_ptr,
        out_ptr,
        table_ptr,
        items,
        STEPS: tl.constexpr,
        WIDE: tl.constexpr,
        BLOCK: tl.constexpr,
        RAW_BLOCK: tl.constexpr,
        ALIGNED: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        lo = pid * 0  # an int64 zero, as ``pid``: the search's ``tl.where`` keeps one type
        hi = lo + items
        for _ in tl.static_range(STEPS):  # the last row whose first program is at most pid
            mid = (lo + hi) // 2
            go = tl.load(table_ptr + mid * WIDE + 5) <= pid
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        row_ptr = table_ptr + lo * WIDE
        # The promises go on the pointers: on the offsets alone the compiler drops them (ptxas: 123 registers).
        source = tl.multiple_of(staged_ptr + tl.load(row_ptr), 16)
        target = tl.load(row_ptr + 1)
        rows = tl.load(row_ptr + 2)
        width = tl.load(row_ptr + 3)
        if ALIGNED:
            width = tl.multiple_of(width, 16)
        step = tl.load(row_ptr + 6)
        mine = pid - tl.load(row_ptr + 5)
        if rows == 0:  # names differ between the branches: Triton wants a name's type the same in both
            byte = tl.arange(0, RAW_BLOCK)
            into = tl.multiple_of(target_ptr + target, 16)
            # ``while``, not ``range``: Triton 3.6's interpreter takes a start or bound computed from the program
            # id as a one-element array, which NumPy 2.4 will not turn into an int (3.9's squeezes it); compiled,
            # both give the same code (sm_90: 32 registers, 8- and 16-byte accesses).
            tile = mine
            while tile < tl.cdiv(width, RAW_BLOCK):
                at = tile * RAW_BLOCK + byte
                within = at < width
                tl.store(into + at, tl.load(source + at, mask=within), mask=within)
                tile += step
        else:
            lane = tl.arange(0, BLOCK)
            blocks = tl.cdiv(width, BLOCK)
            scales = scales_ptr + tl.load(row_ptr + 4)
            out = tl.multiple_of(out_ptr + target, 16)
            tile = mine
            while tile < rows * blocks:
                row = tile // blocks
                column = (tile - row * blocks) * BLOCK + lane
                inside = column < width
                index = row * width + column
                q = tl.load(source + index, mask=inside, other=0).to(tl.float8e4nv, bitcast=True)
                value = q.to(tl.float32) * tl.load(scales + row)
                tl.store(out + index, value.to(out_ptr.dtype.element_ty), mask=inside)
                tile += step

    def expand(
        staged: torch.Tensor, target: torch.Tensor, dtype: torch.dtype, table: torch.Tensor, programs: int, aligned: bool
    ) -> None:
        """Launch the kernel over the tensors ``table`` (int64 ``[n, COLUMNS]``, offsets multiples of ``ALIGN``)
        describes, ``programs`` programs in all: ``staged`` (``uint8``) holds the chunk, ``target`` (``uint8``)
        receives it, its weights in ``dtype``; ``aligned``: every width in the table is a multiple of ``ALIGN``.
        Every tensor on one CUDA device, ``staged`` and ``target`` starting on ``ALIGN``-byte boundaries."""
        for name, tensor in (("staged", staged), ("target", target)):
            if tensor.data_ptr() % ALIGN:  # promised to the compiler: misaligned, the accesses would fault or corrupt
                raise RuntimeError(f"fp8 chunk: the {name} buffer does not start on a {ALIGN}-byte boundary")
        items = table.shape[0]
        _chunk_kernel[(programs,)](
            staged,
            staged[: staged.numel() // 4 * 4].view(torch.float32),
            target,
            target[: target.numel() // dtype.itemsize * dtype.itemsize].view(dtype),
            table,
            items,
            STEPS=max(0, items - 1).bit_length(),
            WIDE=COLUMNS,
            BLOCK=BLOCK,
            RAW_BLOCK=RAW_BLOCK,
            ALIGNED=aligned,
        )

    @functools.cache
    def converts_float8(index: int | None) -> bool:
        """Whether CUDA device ``index`` converts float8 (sm_89 and newer); asked once per device."""
        return torch.cuda.get_device_capability(index) >= (8, 9)

else:
    expand = converts_float8 = None
