"""The Triton kernels run by Triton's interpreter on the CPU (``TRITON_INTERPRET=1``), so that CI checks the
device code's indexing on every change; ``-m cuda`` checks them compiled, on a GPU. The codec's kernel does
integer operations only, which the interpreter runs as the GPU does: its groups, parts, escapes and widths are
checked here bit for bit. The interpreter rounds float32 to bf16 its own way (toward zero, where the GPU rounds to
nearest), so ``fp8_kernel``'s bf16 weights are checked here to one step of the last bit, and everything else
it writes (fp16 weights, tensors copied as they are, the bytes it must leave alone) bit for bit; ``-m cuda``
checks its bf16 weights bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import torch
    from offload_map.runtime import codec, codec_kernel

    assert codec_kernel.expand is not None, "Triton is not installed: pip install -e '.[test]'"
    g = torch.Generator().manual_seed(5)
    n = 3 * 4096 + 300  # words: three whole groups and a short one
    def words(low, high):
        return torch.stack([low, high], dim=1).flatten().to(torch.uint8)
    cases = {
        "bf16 N(0, 0.02)": torch.randn(n, generator=g).mul(0.02).bfloat16().view(torch.uint8),
        "bf16, wide exponents": torch.randn(n, generator=g).mul(torch.rand(n, generator=g) * 1e4).bfloat16().view(torch.uint8),
        "fp16": torch.randn(n, generator=g).half().view(torch.uint8),
        "random bytes": torch.randint(0, 256, (2 * n,), dtype=torch.uint8, generator=g),
        "zeros": torch.zeros(2 * n, dtype=torch.uint8),
        "two high bytes": words(torch.randint(0, 256, (n,), generator=g), torch.randint(0, 2, (n,), generator=g) * 0xBF),
        "twelve high bytes": words(torch.randint(0, 256, (n,), generator=g), torch.randint(0, 12, (n,), generator=g)),
        "every 16-bit pattern": torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8),
        "odd word count": torch.randn(4097, generator=g).mul(0.02).bfloat16().view(torch.uint8),
    }
    widths = set()
    for name, raw in cases.items():
        coded = codec.encode(raw)
        widths.add((coded.bits, coded.raw_bits))
        end = raw.numel()
        for start, stop in [(0, end), (512, end), (0, 512), (8704, 24576), (24576, end), (1024, 1024), (end, end)]:
            if not start <= stop <= end:
                continue
            part = coded.part(start, stop)
            staging = torch.full((codec.footprint(part) + 512,), 9, dtype=torch.uint8)
            planes = part.like(staging[512:])
            for into, plane in zip(planes.planes, part.planes):
                into.copy_(plane)
            out = torch.full((stop - start + 512,), 0xAB, dtype=torch.uint8)
            codec_kernel.expand(planes, out)
            assert torch.equal(out[: stop - start], raw[start:stop]), (name, coded.bits, start, stop)
            assert (out[stop - start :] == 0xAB).all(), ("written past the part", name, start, stop)
    assert {bits for bits, _ in widths} == {1, 2, 3, 4} and any(raw for _, raw in widths), widths
    print("ok")
    """
)


FP8_SCRIPT = textwrap.dedent(
    """
    import torch
    from offload_map.runtime import fp8_kernel
    from offload_map.runtime.fp8_host import Fp8Host
    from offload_map.runtime.host_buffer import layout

    g = torch.Generator().manual_seed(3)
    block = fp8_kernel.BLOCK
    fp8_kernel.PROGRAMS = 3  # programs that loop over several tiles
    tensors = [
        torch.randn(5, 3 * block, generator=g).bfloat16(),
        torch.randn(5, generator=g).bfloat16(),  # a bias: copied as it is
        torch.randn(3, block - 1, generator=g).mul(1e-3).bfloat16(),
        torch.randn(7, 1, generator=g).bfloat16(),
        torch.randn(5000, generator=g),  # float32: more byte tiles than programs
        torch.empty(0),  # nothing to write
        torch.randn(2, block + 1, generator=g).half(),  # another dtype: a launch of its own
        torch.randn(1, 2 * block + 5, generator=g).mul(torch.rand(1, 1, generator=g) + 0.01).bfloat16(),
    ]
    regions, nbytes = layout(tensors)
    raw = torch.zeros(nbytes, dtype=torch.uint8)
    for region, t in zip(regions, tensors):
        region.raw(raw).copy_(t.flatten())
    host = Fp8Host(regions, raw, [t.dim() == 2 for t in tensors], None, False)
    ends = [r.offset for r in regions] + [nbytes]
    for first, last in [(0, 8), (1, 7), (0, 3), (2, 3), (4, 6), (7, 8)]:  # tables of 1 to 6 rows
        start, stop = ends[first], ends[last]
        a, b = host._run(first, last)
        staged = host.store.flat[a:b].clone()
        expected = torch.full((stop - start + 512,), 0xAB, dtype=torch.uint8)  # 512 bytes past the part
        for index in range(first, last):
            host._expand(index, staged, a, expected, start)  # torch, tensor by tensor
        out = torch.full_like(expected, 0xAB)
        for dtype, table, programs, aligned in host.tables(first, last, start):
            fp8_kernel.expand(staged, out, dtype, torch.tensor(table, dtype=torch.int64), programs, aligned)
        words = torch.zeros_like(out, dtype=torch.bool)
        for index in range(first, last):
            region = regions[index]
            if region.dtype == torch.bfloat16 and host.quantize[index]:
                words[region.offset - start : region.offset - start + region.span] = True
                steps = region.raw(out, start).view(torch.int16).int() - region.raw(expected, start).view(torch.int16).int()
                assert steps.abs().max() <= 1, ("more than the interpreter's rounding", index)
        assert torch.equal(out[~words], expected[~words]), (first, last)  # fp16, copies, gaps, past the part
    print("ok")
    """
)


def _interpreted(script: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.skipif(sys.platform != "linux", reason="Triton publishes wheels for Linux only")
def test_the_decode_kernel_gives_every_part_back_bit_for_bit_under_the_interpreter():
    _interpreted(SCRIPT)


@pytest.mark.skipif(sys.platform != "linux", reason="Triton publishes wheels for Linux only")
def test_the_fp8_kernel_expands_each_tensor_of_a_chunk_under_the_interpreter():
    _interpreted(FP8_SCRIPT)


@pytest.mark.skipif(sys.platform != "linux", reason="Triton publishes wheels for Linux only")
def test_the_fp8_kernel_moves_aligned_chunks_many_bytes_at_a_time(monkeypatch):
    """Compiled for an H100/H200 (sm_90; no GPU needed to write its PTX): with its offsets and widths promised
    aligned, the kernel loads and stores 8 and 16 bytes at a time, as the one-weight kernel it replaced did. Promised
    on the offsets alone, the compiler dropped the promise: a byte at a time, 123 registers a thread."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from offload_map.runtime import fp8_kernel

    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, said out loud (else it warns)
    pointers = {"staged_ptr": "*u8", "scales_ptr": "*fp32", "target_ptr": "*u8", "out_ptr": "*bf16", "table_ptr": "*i64"}
    constants = {"STEPS": 5, "WIDE": fp8_kernel.COLUMNS, "BLOCK": fp8_kernel.BLOCK, "RAW_BLOCK": fp8_kernel.RAW_BLOCK}
    ptx = {}
    for aligned in (True, False):
        signature = {**pointers, "items": "i32", **dict.fromkeys([*constants, "ALIGNED"], "constexpr")}
        source = ASTSource(fn=fp8_kernel._chunk_kernel, signature=signature, constexprs={**constants, "ALIGNED": aligned})
        ptx[aligned] = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert "ld.global.v2" in ptx[True] and "st.global.v4" in ptx[True]  # 8 float8 bytes in, 8 bf16 out
    assert "ld.global.b8" not in ptx[True] and "st.global.b8" not in ptx[True]
    assert "ld.global.b8" in ptx[False]  # widths not promised: masks that may end anywhere, a byte at a time
