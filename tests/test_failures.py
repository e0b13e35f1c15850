"""Failures in the middle of a run leave the pipeline working and its device memory where the plan says.

A copy into a slot that raises (a collective timing out, an interrupt), a block whose exception the model catches
and that it runs again, a component that runs out of memory while coming onto the device, a re-plan that does
not fit, and a dispatch interrupted after its weights were packed.
"""

from __future__ import annotations

import pytest
import torch

from offload_map import dispatch_pipeline
from offload_map.demo import make_tiny_pipeline
from offload_map.runtime import sharded_copy
from offload_map.runtime.ring import BlockRing
from offload_map.runtime.unit import OffloadedUnit, TailState

from conftest import assert_restored, pipeline_state, probe_inside, resident_run


def _streamed(target: str, prompt: str, window: int):
    """The demo pipeline, its resident output for ``prompt``, and the pipeline dispatched layer-wise with its DiT's ring."""
    pipe = make_tiny_pipeline()
    reference = resident_run(pipe, lambda: pipe(prompt, steps=2), target)
    handle = dispatch_pipeline(pipe, "layerwise", target, window=window)
    return pipe, reference, handle, handle.runtime.rings["transformer"]


def _heads(ring: BlockRing) -> int:
    return sum(unit.head is not None for unit in ring.units)


def _all_on_host_and_slots_free(ring: BlockRing) -> None:
    prefetcher = ring.prefetcher
    assert prefetcher.running is None
    held = [slot for _, slot in prefetcher.queue] + list(prefetcher.idle)
    assert sorted(map(id, held)) == sorted(map(id, ring.pool.slots)), "every live slot is idle or queued, none lost"
    queued = {prefetcher.order[position] for position, _ in prefetcher.queue}
    for index, unit in enumerate(ring.units):
        assert unit.state is (TailState.LOADED if index in queued else TailState.HOST), unit.path


@pytest.mark.parametrize("window", [1, 2])
def test_a_copy_that_raises_leaves_the_block_on_the_host_and_later_calls_exact(target, monkeypatch, window):
    pipe, reference, handle, ring = _streamed(target, "copy", window)
    copy, calls = sharded_copy.DirectCopy.__call__, []

    def fails_once(self, buffer, src, pinned, path):
        calls.append(path)
        if len(calls) == 4:
            raise RuntimeError(f"simulated copy failure for {path}")
        copy(self, buffer, src, pinned, path)

    monkeypatch.setattr(sharded_copy.DirectCopy, "__call__", fails_once)
    with pytest.raises(RuntimeError, match="simulated copy failure"):
        pipe("copy", steps=2)
    for _ in range(2):
        assert torch.equal(pipe("copy", steps=2).cpu(), reference)
        _all_on_host_and_slots_free(ring)
    handle.runtime.set_residency("transformer", {ring.paths[0]: ring.units[0].nbytes}, window)  # every unit settles
    assert torch.equal(pipe("copy", steps=2).cpu(), reference)
    handle.remove()


@pytest.mark.parametrize("window", [1, 2])
def test_a_block_run_again_after_its_caught_exception_gets_a_slot(target, window):
    pipe, reference, handle, ring = _streamed(target, "retry", window)
    block = pipe.transformer.double_blocks[1]
    forward, failed = block._old_forward, []

    def fails_once(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise RuntimeError("transient")
        return forward(*args, **kwargs)

    block._old_forward = fails_once
    dit, plain = pipe.transformer, pipe.transformer._old_forward

    def retries(latents, t, context):  # a model with a fallback around its blocks
        x = dit.proj_in(latents) + dit.time(t.reshape(1, 1, 1).to(latents.dtype))
        for b in [*dit.double_blocks, *dit.single_blocks]:
            try:
                x = b(x, context)
            except RuntimeError:
                x = b(x, context)
        return dit.proj_out(x)

    dit._old_forward = retries
    assert torch.equal(pipe("retry", steps=2).cpu(), reference)
    assert failed
    _all_on_host_and_slots_free(ring)
    dit._old_forward = plain
    handle.remove()


def test_running_out_of_memory_while_coming_onto_the_device_leaves_nothing_there(target, monkeypatch):
    pipe, reference, handle, ring = _streamed(target, "enter", 2)
    handle.runtime.set_residency("transformer", {p: u.nbytes for p, u in zip(ring.paths[::2], ring.units[::2])}, 2)
    fetch, failed = OffloadedUnit.fetch_head, []

    def out_of_memory_once(self, *args, **kwargs):
        if self.path == ring.paths[2] and not failed:
            failed.append(True)
            raise torch.OutOfMemoryError("simulated")
        return fetch(self, *args, **kwargs)

    monkeypatch.setattr(OffloadedUnit, "fetch_head", out_of_memory_once)
    with pytest.raises(torch.OutOfMemoryError):
        pipe("enter", steps=2)
    assert not ring.active and not ring.pool.slots
    assert all(unit.head is None for unit in ring.units), "the kept block fetched before the failure left too"
    seen = []
    probes = probe_inside(pipe.text_encoder, lambda: seen.append((len(ring.pool.slots), _heads(ring))))
    assert torch.equal(pipe("enter", steps=2).cpu(), reference)
    for probe in probes:
        probe.remove()
    assert seen and set(seen) == {(0, 0)}
    handle.remove()


def test_a_residency_that_does_not_fit_raises_at_once_though_the_component_is_off_the_device(target, monkeypatch):
    pipe, reference, handle, ring = _streamed(target, "fit", 2)
    pipe("fit", steps=2)  # the VAE ran last: the DiT is off the device, as between calls
    assert not ring.active
    fetch = BlockRing.fetch_heads

    def too_many(self):  # the device holds at most three kept blocks
        if sum(1 for unit in self.units if unit.kept) > 3:
            raise torch.OutOfMemoryError("simulated")
        fetch(self)

    monkeypatch.setattr(BlockRing, "fetch_heads", too_many)
    with pytest.raises(torch.OutOfMemoryError, match="re-planning 'transformer'"):
        handle.runtime.set_residency("transformer", {p: u.nbytes for p, u in zip(ring.paths[:4], ring.units[:4])}, 1)
    assert not any(unit.kept for unit in ring.units) and ring.window == 1, "fell back to the smallest plan"
    for _ in range(2):
        assert torch.equal(pipe("fit", steps=2).cpu(), reference)
    handle.runtime.set_residency("transformer", {ring.paths[0]: ring.units[0].nbytes}, 2)  # one that fits
    assert torch.equal(pipe("fit", steps=2).cpu(), reference)
    handle.remove()


def test_a_dispatch_interrupted_after_packing_puts_the_pipeline_back(monkeypatch):
    pipe = make_tiny_pipeline()
    before = pipeline_state(pipe)

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C once the weights are packed and the hooks on

    monkeypatch.setattr("offload_map.dispatch.AutoPlanner", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dispatch_pipeline(pipe, "auto", "cpu", gpu_budget=150_000)
    assert_restored(pipe, before)
    assert not [name for name, module in pipe.named_modules() if hasattr(module, "_hf_hook")]
    monkeypatch.undo()
    handle = dispatch_pipeline(pipe, "auto", "cpu", gpu_budget=150_000)  # nothing left over refuses it
    handle.remove()
