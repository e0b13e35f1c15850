"""Every stream-ordering rule of the runtime (``offload_map.runtime`` docstring), tested with delays injected.

A missing wait only shows when one stream runs late. ``delayed_copies`` makes every host<->device copy first
sleep on the stream it is issued on; the blocks here sleep on the compute stream before reading their
weights, and read all of them. Each test then checks what a missing wait would break: outputs equal the
resident run bit for bit, module tensors between forwards are host tensors, refreshed weights are the ones
used, freed memory is not reused under a reader.

Run on a GPU (``pytest -m cuda``); skipped cleanly elsewhere.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from torch import nn

from offload_map import dispatch_pipeline
from offload_map.demo import make_tiny_pipeline

from conftest import resident_run

pytestmark = pytest.mark.cuda

DIM = 512


@contextlib.contextmanager
def delayed_copies(seconds: float, side_streams_only: bool = False):
    """Every copy between host and device first sleeps ``seconds`` on the stream it is issued on (with
    ``side_streams_only``, only those issued off the default stream: the runtime's copy stream)."""
    cycles = _cycles_for(seconds)
    original = torch.Tensor.copy_

    def copy_(self, src, non_blocking=False):
        side = torch.cuda.current_stream() != torch.cuda.default_stream()
        if self.device.type != src.device.type and (side or not side_streams_only):
            torch.cuda._sleep(cycles)
        return original(self, src, non_blocking)

    torch.Tensor.copy_ = copy_
    try:
        yield
    finally:
        torch.Tensor.copy_ = original


_CYCLES_PER_SECOND: list[float] = []


def _cycles_for(seconds: float) -> int:
    if not _CYCLES_PER_SECOND:
        probe = 20_000_000
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
        start = time.perf_counter()
        torch.cuda._sleep(probe)
        torch.cuda.synchronize()
        _CYCLES_PER_SECOND.append(probe / (time.perf_counter() - start))
    return int(seconds * _CYCLES_PER_SECOND[0])


class DenseBlock(nn.Module):
    """Reads every one of its weights; sleeps ``delay`` seconds on the compute stream first."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(DIM, DIM) / DIM**0.5, requires_grad=False)
        self.register_buffer("shift", torch.randn(DIM))
        self.delay = delay

    def forward(self, x):
        if self.delay:
            torch.cuda._sleep(_cycles_for(self.delay))
        return torch.tanh(x @ self.weight + self.shift)


class DenseDiT(nn.Module):
    _layerwise_offload_blocks_attrs = ["blocks"]

    def __init__(self, n: int = 6, delays: tuple[float, ...] = ()) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DenseBlock(delays[i] if i < len(delays) else 0.0) for i in range(n))
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def _model(seed: int = 0, **kwargs) -> DenseDiT:
    torch.manual_seed(seed)
    return DenseDiT(**kwargs).eval().requires_grad_(False)


def _reference(model: DenseDiT, x: torch.Tensor) -> torch.Tensor:
    twin = _model(n=len(model.blocks))
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        return twin.cuda()(x.cuda()).cpu()


@pytest.mark.parametrize("window", [1, 2, 3])
@torch.inference_mode()
def test_slow_copies_and_slow_blocks_give_the_resident_output(window):
    # Rules 2 and 3: a block waits for its copy; a copy waits for the slot's last reader.
    model = _model(delays=(0.004, 0.0, 0.004, 0.0, 0.004, 0.0))
    x = torch.randn(8, DIM)
    reference = _reference(model, x)
    handle = dispatch_pipeline(model, "layerwise", "cuda", window=window)
    with delayed_copies(0.003):
        outputs = [model(x) for _ in range(4)]
    assert all(torch.equal(out.cpu(), reference) for out in outputs)
    handle.remove()


@torch.inference_mode()
def test_between_forwards_every_block_tensor_is_a_host_tensor():
    # Rule 3: the next step's prefetch is in flight, but no module points at a slot outside its forward.
    model = _model()
    handle = dispatch_pipeline(model, "layerwise", "cuda", window=2)
    with delayed_copies(0.01):
        model(torch.randn(8, DIM))
        on_device = [n for n, t in model.blocks.state_dict(keep_vars=True).items() if t.device.type != "cpu"]
    assert not on_device, f"block tensors on the device between forwards: {on_device}"
    handle.remove()


@pytest.mark.parametrize("strategy", ["layerwise", "model"])
@torch.inference_mode()
def test_refresh_with_copies_in_flight_keeps_the_new_weights(strategy):
    # Rule 6: the documented way to change weights, while the next step's first blocks are still being copied.
    model, changed = _model(), _model(seed=1)
    x = torch.randn(8, DIM)
    expected = _reference(changed, x)
    handle = dispatch_pipeline(model, strategy, "cuda", window=2)
    with delayed_copies(0.05, side_streams_only=True):
        model(x)
        model.load_state_dict(changed.state_dict())
        handle.refresh()
        outputs = [model(x).cpu() for _ in range(3)]
    assert all(torch.equal(out, expected) for out in outputs)
    handle.remove()
    assert all(torch.equal(a.cpu(), b) for a, b in zip(model.state_dict().values(), changed.state_dict().values()))


def _overwrite_free_memory(nbytes: int) -> list[torch.Tensor]:
    # Allocations on the default stream that reuse freed blocks, filled at once with garbage.
    return [torch.full((nbytes,), 255, dtype=torch.uint8, device="cuda") for _ in range(12)]


@torch.inference_mode()
def test_a_replan_while_a_user_stream_still_reads_the_slots_waits_for_it():
    # Rule 5: the slots are given back only after their last reader, here on a stream of the user's. With a slot
    # per block nothing is copied once every block sits in its slot, so no copy orders the replan after it.
    model = _model(delays=(0, 0, 0, 0, 0, 0.05))
    x = torch.randn(8, DIM, device="cuda")
    reference = _reference(model, x)
    handle = dispatch_pipeline(model, "layerwise", "cuda", window=len(model.blocks))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model(x)
        out = model(x)  # the last block sleeps 50 ms on the user's stream before reading its slot
    slot_bytes = handle.runtime.rings[""].slot_bytes
    handle.runtime.set_residency("", {}, 1)  # frees the slots from the default stream
    garbage = _overwrite_free_memory(slot_bytes)
    stream.synchronize()
    assert torch.equal(out.cpu(), reference)
    del garbage
    handle.remove()


@torch.inference_mode()
def test_remove_while_a_user_stream_still_reads_the_weights_waits_for_it():
    # Rule 6: restore waits for the whole device before freeing slots and moving weights back.
    model = _model(delays=(0, 0, 0, 0, 0, 0.05))
    x = torch.randn(8, DIM, device="cuda")
    reference = _reference(model, x)
    handle = dispatch_pipeline(model, "layerwise", "cuda", window=2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model(x)
        out = model(x)
    slot_bytes = handle.runtime.rings[""].slot_bytes
    handle.remove()
    garbage = _overwrite_free_memory(slot_bytes)
    stream.synchronize()
    assert torch.equal(out.cpu(), reference)
    del garbage


@torch.inference_mode()
def test_kept_parts_and_pinned_components_with_slow_copies_give_the_resident_output():
    # Rule 4: heads (kept block parts, pinned components) are waited for before use, and leave safely.
    pipe = make_tiny_pipeline()
    reference = resident_run(pipe, lambda: pipe("slow copies", steps=3), "cuda")
    handle = dispatch_pipeline(pipe, "layerwise", "cuda", window=1)
    ring = handle.runtime.rings["transformer"]
    kept = {unit.path: unit.split_points()[0] for unit in ring.units[::2]}
    kept[ring.units[1].path] = ring.units[1].nbytes  # one block kept whole
    handle.runtime.set_residency("transformer", kept, 2)
    with delayed_copies(0.003):
        outputs = [pipe("slow copies", steps=3) for _ in range(3)]  # the encoder evicts the kept parts each call
    assert all(torch.equal(out, reference) for out in outputs)
    handle.remove()
    assert torch.equal(resident_run(pipe, lambda: pipe("slow copies", steps=3), "cuda"), reference)


@torch.inference_mode()
def test_host_buffers_are_pinned_at_their_exact_size_and_unregistered_on_remove():
    # Rule 6: nothing is unregistered while a copy may read it; after remove, nothing stays registered.
    model = _model()
    handle = dispatch_pipeline(model, "layerwise", "cuda", window=2)
    flats = [buffer.flat for buffer in handle.runtime.host_buffers]  # keeps the memory alive to ask about it
    assert flats and all(flat.is_pinned() for flat in flats)
    assert all(flat.numel() == DIM * DIM * 4 + DIM * 4 for flat in flats)  # weight and shift, each 512-aligned
    with delayed_copies(0.02):
        model(torch.randn(8, DIM))
        handle.remove()
    assert not any(flat.is_pinned() for flat in flats), "a host buffer is still page-locked after remove()"


@torch.inference_mode()
def test_detach_with_a_component_copy_in_flight_lets_the_host_buffers_go_only_after_it():
    # Rule 6 for detach: the handle, and with it the host buffers, may be dropped at once; a pinned component's
    # copy still reading its host buffer must have finished (its head stays on the device, read afterwards).
    import gc

    pipe = make_tiny_pipeline()
    expected = {name: t.clone() for name, t in pipe.text_encoder.state_dict().items()}
    handle = dispatch_pipeline(pipe, "model", "cuda")
    with delayed_copies(0.1, side_streams_only=True):
        handle.runtime.activate("text_encoder")  # its copy sleeps 100 ms on the copy stream first
        handle.detach()
    del handle
    gc.collect()
    garbage = [torch.full((1 << 20,), 255, dtype=torch.uint8) for _ in range(64)]  # reuse freed host memory
    torch.cuda.synchronize()
    got = pipe.text_encoder.state_dict()
    assert all(got[name].device.type == "cuda" and torch.equal(got[name].cpu(), t) for name, t in expected.items())
    del garbage
