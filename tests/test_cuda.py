"""On a CUDA device: no host synchronisation in the steady state, copies overlap compute, memory bounded.

Run on the device machine with ``pytest -m cuda``; skipped cleanly elsewhere.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from offload_map import dispatch_pipeline

from conftest import assert_no_host_sync

pytestmark = pytest.mark.cuda

MIB = 1 << 20


class SleepyBlock(nn.Module):
    """A block of ``mib`` MiB of weights whose "compute" is a GPU sleep of ``cycles`` clock cycles."""

    def __init__(self, mib: int, cycles: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(mib * MIB // 4), requires_grad=False)
        self.cycles = cycles

    def forward(self, x):
        torch.cuda._sleep(self.cycles)
        return x + self.weight[:1]


class SleepyDiT(nn.Module):
    _layerwise_offload_blocks_attrs = ["blocks"]

    def __init__(self, n: int, mib: int, cycles: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SleepyBlock(mib, cycles) for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _timed(fn, repeats=3):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _cycles_for(seconds: float) -> int:
    probe = 10_000_000
    elapsed = _timed(lambda: torch.cuda._sleep(probe))
    return int(probe * seconds / elapsed)


@torch.inference_mode()
def test_copies_overlap_compute():
    n, mib = 12, 128
    x = torch.zeros(1, device="cuda")
    host = torch.empty(mib * MIB, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    copy = _timed(lambda: dev.copy_(host, non_blocking=True))
    cycles = _cycles_for(copy)
    model = SleepyDiT(n, mib, cycles)
    compute = _timed(lambda: [torch.cuda._sleep(cycles) for _ in range(n)])
    handle = dispatch_pipeline(model, "layerwise", "cuda", window=2)
    model(x)
    step = _timed(lambda: model(x))
    serial = compute + n * copy
    print(
        f"copy/block {copy * 1e3:.2f} ms, compute {compute * 1e3:.1f} ms, serial {serial * 1e3:.1f} ms, step {step * 1e3:.1f} ms"
    )
    assert step < 0.7 * serial, "copies did not overlap compute"
    assert step < 1.25 * max(compute, n * copy)
    handle.remove()


@torch.inference_mode()
def test_steady_state_never_synchronises_the_host():
    model = SleepyDiT(6, 8, 1000)
    x = torch.zeros(1, device="cuda")
    handle = dispatch_pipeline(model, "layerwise", "cuda", window=2)
    model(x)
    model(x)
    assert_no_host_sync(lambda: model(x))
    handle.remove()


@torch.inference_mode()
def test_peak_memory_is_resident_plus_window_slots():
    n, mib, window = 8, 64, 2
    model = SleepyDiT(n, mib, 1000)
    x = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    handle = dispatch_pipeline(model, "layerwise", "cuda", window=window)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        model(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert handle.report().slot_bytes == window * mib * MIB
    assert peak <= window * mib * MIB + 4 * MIB, f"peak {peak / MIB:.1f} MiB"
    handle.remove()
