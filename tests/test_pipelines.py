"""Real pipelines through their own __call__ under every strategy: outputs equal the resident run, bit for bit."""

from __future__ import annotations

import pytest
import torch

from offload_map import Role, dispatch_pipeline
from offload_map.demo import make_tiny_pipeline
from conftest import resident_run
from tiny_pipelines import make_flux_pipeline, make_wan22_pipeline, run_flux, run_wan22

PIPELINES = {
    "flux": (make_flux_pipeline, run_flux),
    "wan22": (make_wan22_pipeline, run_wan22),
    "plain": (make_tiny_pipeline, lambda pipe: pipe("a red cat", steps=3)),
}


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def case(request, target):
    make, run = PIPELINES[request.param]
    pipe = make()
    return request.param, pipe, run, resident_run(pipe, lambda: run(pipe), target)


@pytest.fixture(autouse=True)
def _no_leftover_dispatch(case):
    # A failing test must not leave the shared pipeline dispatched for the next one.
    yield
    handle = getattr(case[1], "_offload_map_handle", None)
    if handle is not None:
        handle.remove()


def _block_count(pipe) -> int:
    from offload_map.collect.blocks import get_blocks

    return max(len(get_blocks(m)) for n, m in _dits(pipe))


def _dits(pipe):
    from offload_map.module_collector import ModuleDiscovery

    found = ModuleDiscovery.discover(pipe)
    return [(c.name, c.module) for c in found.components.values() if c.role is Role.DIT]


def _state(pipe):
    from offload_map.module_collector import ModuleDiscovery

    return {
        f"{c.name}.{k}": (v.device, v.dtype, v.stride(), v.detach().clone())
        for c in ModuleDiscovery.discover(pipe).components.values()
        for k, v in c.module.state_dict(keep_vars=True).items()
    }


def _assert_restored(pipe, before):
    after = _state(pipe)
    assert after.keys() == before.keys()
    for key, (device, dtype, stride, value) in before.items():
        d, t, s, v = after[key]
        assert (d, t, s) == (device, dtype, stride), key
        assert torch.equal(v, value), key
    for _, module in _dits(pipe):
        for m in module.modules():
            assert not hasattr(m, "_hf_hook") and "forward" not in m.__dict__
    assert not hasattr(pipe, "_offload_map_handle")


def test_model_strategy_is_bit_exact_and_exclusive(case, target):
    name, pipe, run, reference = case
    before = _state(pipe)
    handle = dispatch_pipeline(pipe, "model", target)
    roles = dict(handle.device_map.components)
    seen = []

    def probe(*_):
        on = handle.on_device()
        seen.append(on)
        pinned_dits = [n for n in on if roles[n] is Role.DIT]
        assert len(pinned_dits) <= 1, f"two DiTs on the device together: {on}"
        assert not (pinned_dits and any(roles[n] is Role.ENCODER for n in on)), f"DiT and encoder together: {on}"

    probes = [m.register_forward_hook(probe) for _, m in _dits(pipe)]
    probes += [c.register_forward_hook(probe) for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)] if hasattr(pipe, "components") else []
    try:
        assert torch.equal(run(pipe).cpu(), reference)
        assert torch.equal(run(pipe).cpu(), reference)
    finally:
        for p in probes:
            p.remove()
    assert seen, "the probe never ran"
    assert handle.report().stats.component_loads > 0
    handle.remove()
    _assert_restored(pipe, before)
    assert torch.equal(resident_run(pipe, lambda: run(pipe), target), reference)


@pytest.mark.parametrize("window", [1, 2, 3, 100])
def test_layerwise_is_bit_exact_for_every_window(case, target, window):
    name, pipe, run, reference = case
    before = _state(pipe)
    handle = dispatch_pipeline(pipe, "layerwise", target, window=window)
    for _ in range(2):
        assert torch.equal(run(pipe).cpu(), reference)
    stats = handle.report().stats
    assert stats.block_loads > 0 and stats.on_demand_loads == 0
    handle.remove()
    _assert_restored(pipe, before)


def test_layerwise_window_covering_all_blocks_loads_each_block_once(case, target):
    name, pipe, run, reference = case
    handle = dispatch_pipeline(pipe, "layerwise", target, window=_block_count(pipe))
    run(pipe)
    loads = handle.report().stats.block_loads
    assert torch.equal(run(pipe).cpu(), reference)
    assert handle.report().stats.block_loads == loads, "blocks were copied again although all fit in the window"
    handle.remove()


def test_none_strategy_is_bit_exact(case, target):
    name, pipe, run, reference = case
    handle = dispatch_pipeline(pipe, "none", target)
    assert torch.equal(run(pipe).cpu(), reference)
    handle.remove()
    assert torch.equal(resident_run(pipe, lambda: run(pipe), target), reference)
