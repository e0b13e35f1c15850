"""Real pipelines through their own __call__ under every strategy: outputs equal the resident run, bit for bit."""

from __future__ import annotations

import pytest
import torch

from offload_map import Role, dispatch_pipeline

from conftest import assert_parity, assert_restored, dits, pipeline_state, probe_inside, resident_run


@pytest.fixture(autouse=True)
def _no_leftover_dispatch(case):
    # A failing test must not leave the shared pipeline dispatched for the next one.
    yield
    handle = getattr(case.pipe, "_offload_map_handle", None)
    if handle is not None:
        handle.remove()


def _block_count(pipe) -> int:
    from offload_map.collect.blocks import get_blocks

    return max(len(get_blocks(m)) for n, m in dits(pipe))


def test_model_strategy_is_bit_exact_and_exclusive(case, target):
    name, pipe, run, reference = case
    before = pipeline_state(pipe)
    handle = dispatch_pipeline(pipe, "model", target)
    roles = dict(handle.device_map.components)
    seen = []

    def probe():
        on = handle.on_device()
        seen.append(on)
        pinned_dits = [n for n in on if roles[n] is Role.DIT]
        assert len(pinned_dits) <= 1, f"two DiTs on the device together: {on}"
        assert not (pinned_dits and any(roles[n] is Role.ENCODER for n in on)), f"DiT and encoder together: {on}"

    probes = [p for _, m in dits(pipe) for p in probe_inside(m, probe)]
    probes += (
        [p for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in probe_inside(c, probe)]
        if hasattr(pipe, "components")
        else []
    )
    try:
        assert torch.equal(run(pipe).cpu(), reference)
        assert torch.equal(run(pipe).cpu(), reference)
    finally:
        for p in probes:
            p.remove()
    assert seen, "the probe never ran"
    assert handle.report().stats.component_loads > 0
    handle.remove()
    assert_restored(pipe, before)
    assert torch.equal(resident_run(pipe, lambda: run(pipe), target), reference)


@pytest.mark.parametrize("window", [1, 2, 3, 100])
def test_layerwise_is_bit_exact_for_every_window(case, target, window):
    pipe = case.pipe
    before = pipeline_state(pipe)
    handle = assert_parity(case, target, strategy="layerwise", window=window)
    stats = handle.report().stats
    assert stats.block_loads > 0 and stats.on_demand_loads == 0
    handle.remove()
    assert_restored(pipe, before)


def test_layerwise_window_covering_all_blocks_loads_each_block_once_per_call(case, target):
    # Every step of a call reuses the slots; between calls the encoders and the VAE run, and the DiT's slots
    # leave the device for them.
    name, pipe, run, reference = case
    handle = dispatch_pipeline(pipe, "layerwise", target, window=_block_count(pipe))
    run(pipe)
    loads = handle.report().stats.block_loads
    assert torch.equal(run(pipe).cpu(), reference)
    blocks = sum(len(ring.units) for ring in handle.runtime.rings.values())
    assert handle.report().stats.block_loads - loads == blocks, "blocks were copied more than once in a call"
    handle.remove()


def test_none_strategy_is_bit_exact(case, target):
    name, pipe, run, reference = case
    assert_parity(case, target, runs=1, strategy="none").remove()
    assert torch.equal(resident_run(pipe, lambda: run(pipe), target), reference)


@pytest.mark.parametrize("strategy", ["layerwise", "model"])
def test_a_component_that_came_in_under_inference_mode_runs_outside_it(case, target, strategy):
    # Slots allocated while a forward ran under torch.inference_mode() were inference tensors, which nothing may write
    # outside it: the next forward of that component under no_grad (as diffusers' calls run) failed copying a block.
    pipe = case.pipe
    before = pipeline_state(pipe)
    name, dit = dits(pipe)[0]
    seen = []
    keep = dit.register_forward_hook(lambda m, args, kwargs, out: seen.append((args, kwargs, out)), with_kwargs=True)
    handle = dispatch_pipeline(pipe, strategy, target)
    assert torch.equal(case.run(pipe).cpu(), case.reference)
    keep.remove()
    args, kwargs, out = seen[0]
    with torch.inference_mode():
        assert torch.equal(dit(*args, **kwargs)[0], out[0])
    with torch.no_grad():
        assert torch.equal(dit(*args, **kwargs)[0], out[0])
    assert torch.equal(case.run(pipe).cpu(), case.reference)
    handle.remove()
    assert_restored(pipe, before)
