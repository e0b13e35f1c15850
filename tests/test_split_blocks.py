"""Blocks streamed in part: their first whole submodules stay on the device and only the rest goes through a slot."""

from __future__ import annotations

import torch

import offload_map.auto
from offload_map import DeviceMap, Placement, compile_device_map, dispatch_pipeline
from offload_map.collect.tensors import TensorRef
from offload_map.planning.cost_model import BlockCost, ModelCost, simulate
from offload_map.planning.planner import BlockPlan, plan_blocks, plan_memory
from offload_map.runtime.host_buffer import HostBuffer
from offload_map.runtime.streams import SyncOrdering
from offload_map.runtime.unit import OffloadedUnit

from conftest import assert_restored, pipeline_state


def _rings(handle):
    return handle.runtime.rings


def _set(handle, name, resident, window, kept=None):
    """Keep blocks ``resident`` (indices) whole and the first ``kept[i]`` bytes of block ``i`` on the device."""
    ring = _rings(handle)[name]
    by_path = {ring.units[i].path: ring.units[i].nbytes for i in resident}
    by_path.update((ring.units[i].path, size) for i, size in (kept or {}).items())
    handle.runtime.set_residency(name, by_path, window)


def test_split_points_cut_only_between_whole_submodules(diffusers_case, target):
    pipe = diffusers_case.pipe
    handle = dispatch_pipeline(pipe, "layerwise", target)
    try:
        for ring in _rings(handle).values():
            for unit in ring.units:
                path, points = unit.path, unit.split_points()
                assert points, f"{path}: a block of several submodules can be cut"
                assert list(points) == sorted(set(points)) and 0 < points[0] and points[-1] < unit.nbytes
                for point in points:
                    before = {
                        r.qualname[len(path) + 1 :].split(".")[0]
                        for r, g in zip(unit.refs, unit.host.regions)
                        if g.offset < point
                    }
                    after = {
                        r.qualname[len(path) + 1 :].split(".")[0]
                        for r, g in zip(unit.refs, unit.host.regions)
                        if g.offset >= point
                    }
                    assert before and after and not before & after, (path, point, before, after)
    finally:
        handle.remove()


def test_blocks_kept_in_part_are_bit_exact_and_stream_only_the_rest(diffusers_case, target):
    _, pipe, run, reference = diffusers_case
    before = pipeline_state(pipe)
    handle = dispatch_pipeline(pipe, "layerwise", target, window=2)
    try:
        for cut in (0, -1):  # a first plan, then another that keeps more while blocks still sit in slots
            for name, ring in _rings(handle).items():
                kept = {i: u.split_points()[cut] for i, u in enumerate(ring.units) if i % 3 != 2}
                resident = frozenset(i for i in range(len(ring.units)) if i % 3 == 2)
                _set(handle, name, resident, 2, kept)
                parts = [ring.units[i].nbytes - kept[i] for i in kept]
                assert ring.slot_bytes == max(parts) < max(u.nbytes for u in ring.units)
            for _ in range(3):  # across the wrap-around, and with encoders evicting the kept parts in between
                assert torch.equal(run(pipe).cpu(), reference)
        for name, ring in _rings(handle).items():  # back to every block streamed whole
            _set(handle, name, frozenset(), 2)
            assert ring.slot_bytes == max(u.nbytes for u in ring.units)
        assert torch.equal(run(pipe).cpu(), reference)
    finally:
        handle.remove()
    assert_restored(pipe, before)


def test_planner_keeps_part_of_each_block_when_whole_slots_cost_too_much():
    # Four 1000-byte blocks, 1 ms of compute each, 500 bytes copy in 1 ms; 3000 bytes of budget.
    whole = ModelCost(tuple(BlockCost(f"b.{i}", 1000, 1e-3) for i in range(4)))
    split = ModelCost(tuple(BlockCost(f"b.{i}", 1000, 1e-3, (500,)) for i in range(4)))
    without = plan_blocks(whole, 3000, 5e5)
    plan = plan_blocks(split, 3000, 5e5)
    assert plan.kept and set(plan.kept.values()) == {500} and set(plan.kept) <= plan.streamed
    assert plan.memory == plan_memory(split, plan.streamed, plan.window, plan.kept) <= 3000
    assert plan.step_s < without.step_s
    assert plan.streamed_bytes == sum(1000 - plan.kept.get(i, 0) for i in plan.streamed)
    assert "in part" in plan.explain() and "500 B" in plan.explain()


def _keep_first_part(cost: ModelCost, budget: int, bandwidth: float) -> BlockPlan:
    """A stand-in planner: every block streams, keeping its first whole submodules (where it can be cut)."""
    kept = {i: b.splits[0] for i, b in enumerate(cost.blocks) if b.splits}
    streamed = frozenset(range(len(cost.blocks)))
    return BlockPlan(cost, bandwidth, budget, 2, streamed, simulate(cost, streamed, 2, bandwidth, kept=kept), kept)


def _dispatch_split_auto(pipe, target, monkeypatch):
    """``auto`` within 80% of the weights, planned by ``_keep_first_part``."""
    monkeypatch.setattr(offload_map.auto, "plan_blocks", _keep_first_part)
    total = sum(compile_device_map(pipe, "none", target).bytes_by_placement().values())
    return dispatch_pipeline(pipe, "auto", target, gpu_budget=int(0.8 * total))


def test_auto_writes_a_split_plan_into_the_map_and_the_saved_map_dispatches_again(diffusers_case, target, monkeypatch):
    _, pipe, run, reference = diffusers_case
    handle = _dispatch_split_auto(pipe, target, monkeypatch)
    for _ in range(3):
        assert torch.equal(run(pipe).cpu(), reference)
    assert handle.plans and all(plan.kept for plan in handle.plans.values())
    dmap = handle.device_map
    nested = {
        p: e
        for p, e in dmap.entries.items()
        if e.placement is Placement.GPU and any(p.startswith(b + ".") for b in dmap.paths(Placement.LAYER_WINDOW))
    }
    assert nested, "kept submodules appear as 'gpu' entries inside their blocks"
    text = dmap.to_json()
    streamed_before = {n: [u.nbytes for u in r.units] for n, r in _rings(handle).items()}
    handle.remove()
    again = dispatch_pipeline(pipe, device_map=DeviceMap.from_json(text))
    try:
        for name, ring in _rings(again).items():
            assert all(u.nbytes < whole for u, whole in zip(ring.units, streamed_before[name]))
        assert torch.equal(run(pipe).cpu(), reference)
    finally:
        again.remove()


def test_a_changed_plan_records_its_blocks_anew_and_the_map_dispatches_again():
    # When a component's plan changes (runs counted after the first call, a refit, a refresh), the recorded map holds
    # the new plan's kept parts only, and a block kept whole again counts all its bytes.
    from tiny_pipelines import make_flux_pipeline

    pipe = make_flux_pipeline()
    handle = dispatch_pipeline(pipe, "layerwise", "cpu")
    ring = next(r for r in handle.runtime.plan.rings if r.component == "transformer")
    block, base = ring.blocks[0], handle.device_map
    points = handle.runtime.host.units[block.path].split_points()
    handle.remove()
    for sizes in ([points[1], points[0]], [points[0], block.nbytes * 2], [points[0], 0], [points[1], points[0], 10**9]):
        dmap = base
        for size in sizes:
            dmap = offload_map.auto._recorded(dmap, ring.blocks, {block.path: size} if size else {}, 2)
        inside = [p for p in dmap.paths() if p.startswith(block.path + ".")]
        assert len(inside) == (1 if sizes[-1] == points[0] else 0), (sizes, inside)
        dispatch_pipeline(pipe, device_map=DeviceMap.from_json(dmap.to_json())).remove()


def test_zero_size_tensors_get_views_and_add_no_cut():
    block = torch.nn.Module()
    block.a = torch.nn.Linear(4, 4)
    block.z = torch.nn.Module()
    block.z.register_buffer("e", torch.zeros(0))
    refs = [
        TensorRef(block.a, "weight", True, "b.a.weight", "b.a"),
        TensorRef(block.a, "bias", True, "b.a.bias", "b.a"),
        TensorRef(block.z, "e", False, "b.z.e", "b.z"),
    ]
    host = HostBuffer([r.tensor for r in refs])
    for index, ref in enumerate(refs):
        host.write(index, ref.tensor)
    unit = OffloadedUnit("b", refs, host, SyncOrdering(torch.device("cpu")))
    unit.bind_host()
    assert len(unit.host_views) == len(refs) and block.z.e is unit.host_views[-1]  # bound like the others
    assert unit.split_points() == ()  # the only cut would keep everything but an empty buffer


def test_refresh_after_a_split_plan_keeps_the_map_dispatchable(diffusers_case, target, monkeypatch):
    _, pipe, run, reference = diffusers_case
    handle = _dispatch_split_auto(pipe, target, monkeypatch)
    for _ in range(2):
        run(pipe)
    planned = {p for p, e in handle.device_map.entries.items() if e.placement is Placement.GPU}
    monkeypatch.setattr(handle.runtime, "modules_changed", lambda: True)  # as after loading a LoRA
    handle.refresh()  # rebuilds under the map it was dispatched with; the new runtime plans again
    assert {p for p, e in handle.device_map.entries.items() if e.placement is Placement.GPU} < planned, "no plan yet"
    for _ in range(3):
        assert torch.equal(run(pipe).cpu(), reference)
    assert handle.plans, "planned again from new measurements"
    text = handle.device_map.to_json()
    handle.remove()
    again = dispatch_pipeline(pipe, device_map=DeviceMap.from_json(text))
    try:
        assert torch.equal(run(pipe).cpu(), reference)
    finally:
        again.remove()
