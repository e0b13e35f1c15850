"""Encoders streamed layer by layer: T5 and CLIP (Flux), UMT5 (Wan2.2), a decoder-style Llama text encoder.

Outputs equal the resident run bit for bit for every window; the device map shows encoder blocks as
``"layer-window"``; components that take turns are never on the device together; bad maps are refused with
nothing moved.
"""

from __future__ import annotations

import pytest
import torch

import offload_map.mapping.compiler
from offload_map import BudgetTooSmall, Placement, Role, compile_device_map, dispatch_pipeline

from conftest import assert_parity, assert_restored, pipeline_state, probe_inside, resident_run


@pytest.fixture
def stream_every_encoder(monkeypatch):
    # The tiny encoders are kilobytes: lower the size from which "layerwise" streams a component.
    monkeypatch.setattr(offload_map.mapping.compiler, "STREAM_MIN_BYTES", 0)


def _encoders(dmap) -> list[str]:
    return [name for name, role in dmap.components.items() if role is Role.ENCODER]


@pytest.mark.usefixtures("stream_every_encoder")
@pytest.mark.parametrize("window", [1, 2, 3])
def test_layerwise_streams_the_encoders_bit_exactly(encoder_case, target, window):
    before = pipeline_state(encoder_case.pipe)
    handle = assert_parity(encoder_case, target, strategy="layerwise", window=window)
    dmap = handle.device_map
    streamed = {name for name in _encoders(dmap) if any(p.startswith(name + ".") for p in dmap.paths("layer-window"))}
    assert streamed == set(_encoders(dmap)), f"every encoder of {encoder_case.name} has blocks and streams"
    assert set(handle.runtime.rings) >= streamed
    handle.remove()
    assert_restored(encoder_case.pipe, before)


def test_small_encoders_move_whole_and_big_ones_stream(encoder_case, monkeypatch):
    dmap = compile_device_map(encoder_case.pipe, "layerwise", "cpu")
    assert all(dmap[name] is Placement.CPU_PINNED for name in _encoders(dmap)), "kilobyte encoders stay whole"
    sizes = {
        name: sum(e.nbytes for p, e in dmap.entries.items() if p == name or p.startswith(name + ".")) for name in _encoders(dmap)
    }
    largest = max(sizes, key=sizes.get)
    monkeypatch.setattr(offload_map.mapping.compiler, "STREAM_MIN_BYTES", sizes[largest])
    dmap = compile_device_map(encoder_case.pipe, "layerwise", "cpu")
    for name in _encoders(dmap):
        streams = any(p.startswith(name + ".") for p in dmap.paths("layer-window"))
        assert streams == (sizes[name] >= sizes[largest]), name


@pytest.mark.usefixtures("stream_every_encoder")
def test_components_that_take_turns_are_never_on_the_device_together(encoder_case, target):
    # Probed inside each component (before each of its leaf modules runs), over two calls.
    pipe = encoder_case.pipe
    handle = dispatch_pipeline(pipe, "layerwise", target, window=2)
    roles = dict(handle.device_map.components)
    seen = []

    def probe(name):
        def check(*_):
            on = handle.on_device()
            seen.append(name)
            assert name in on, f"{name} runs but is not on the device"
            dits = [n for n in on if roles[n] is Role.DIT]
            assert len(dits) <= 1, f"two DiTs on the device together: {on}"
            assert not (dits and any(roles[n] is Role.ENCODER for n in on)), f"a DiT and an encoder together: {on}"

        return check

    _calls_with(encoder_case, _probe_inside(pipe, roles, probe), 2)
    assert set(seen) >= set(_encoders(handle.device_map))
    handle.remove()


def _calls_with(case, hooks: list, calls: int) -> None:
    # ``calls`` calls of the pipeline, each output the resident one, with ``hooks`` on; they come off afterwards.
    try:
        for _ in range(calls):
            assert torch.equal(case.run(case.pipe).cpu(), case.reference)
    finally:
        for hook in hooks:
            hook.remove()


def _probe_inside(pipe, roles, probe) -> list:
    # ``probe(name)()`` while component ``name`` runs (``conftest.probe_inside``).
    return [
        hook for name, module in _components(pipe) if roles[name] is not Role.OTHER for hook in probe_inside(module, probe(name))
    ]


def _components(pipe):
    from offload_map.module_collector import ModuleDiscovery

    return [(c.name, c.module) for c in ModuleDiscovery.discover(pipe).components.values()]


def test_an_edited_map_streams_one_encoder_and_keeps_blocks_of_another_resident(encoder_case, target):
    pipe = encoder_case.pipe
    dmap = compile_device_map(pipe, "layerwise", target)
    name = _encoders(dmap)[-1]
    from offload_map.collect.blocks import get_blocks

    blocks = [f"{name}.{path}" for path, _ in get_blocks(dict(_components(pipe))[name])]
    dmap[name] = "gpu"
    for path in blocks:
        dmap[path] = "layer-window"
    dmap[blocks[0]] = "gpu"  # one block of the streamed encoder stays resident
    handle = dispatch_pipeline(pipe, device_map=dmap)
    for _ in range(2):
        assert torch.equal(encoder_case.run(pipe).cpu(), encoder_case.reference)
    assert [u.path for u in handle.runtime.rings[name].units] == blocks[1:]
    handle.remove()


def test_streaming_an_encoder_without_block_lists_is_refused_naming_the_fix():
    from offload_map.demo import make_tiny_pipeline

    pipe = make_tiny_pipeline()  # its text encoder is an embedding and a Sequential of mixed layers
    dmap = compile_device_map(pipe, "layerwise", "cpu")
    dmap["text_encoder"] = "gpu"
    dmap["text_encoder.layers"] = "layer-window"
    with pytest.raises(ValueError, match=r"'text_encoder' \(TinyTextEncoder\) has no block lists: declare them"):
        dispatch_pipeline(pipe, device_map=dmap)
    assert not hasattr(pipe, "_offload_map_handle") and not hasattr(pipe.text_encoder, "_hf_hook")


@pytest.mark.usefixtures("stream_every_encoder")
def test_a_budget_below_the_streamed_pipelines_minimum_is_refused_with_nothing_moved(encoder_case):
    pipe = encoder_case.pipe
    before = pipeline_state(pipe)
    with pytest.raises(BudgetTooSmall, match="below the minimum") as err:
        dispatch_pipeline(pipe, "layerwise", "cpu", gpu_budget=1024)
    assert err.value.minimum > 1024
    assert_restored(pipe, before)


@pytest.mark.usefixtures("stream_every_encoder")
def test_a_streamed_components_weights_outside_its_blocks_leave_while_the_components_it_excludes_run(encoder_case, target):
    # UMT5's embeddings are 2-4 GB: resident, they sat beside the DiT for every step and beside the VAE's decode.
    pipe = encoder_case.pipe
    before = pipeline_state(pipe)
    handle = dispatch_pipeline(pipe, "layerwise", target, window=2)
    roles = dict(handle.device_map.components)
    rings = handle.runtime.rings
    assert rings and all(handle.device_map[name] is Placement.CPU_PINNED for name in rings)
    pinned = handle.runtime.swapper.pinned
    seen = set()

    def probe(name):
        def check(*_):
            seen.add(name)
            for other in rings:
                loaded = pinned[other].head is not None
                if other == name:
                    assert loaded, f"{name} runs without its weights outside the blocks"
                elif roles[name].excludes(roles[other]):
                    assert not loaded, f"{other}'s weights outside its blocks stay on the device while {name} runs"

        return check

    hooks = _probe_inside(pipe, roles, probe)
    stats = handle.report().stats
    moved = []
    try:
        for _ in range(3):
            assert torch.equal(encoder_case.run(pipe).cpu(), encoder_case.reference)
            moved.append(stats.component_bytes)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen >= set(rings)
    # Each takes its turn once a call: everything pinned crosses the link once, not once per forward.
    assert moved[2] - moved[1] == sum(unit.nbytes for unit in pinned.values())
    handle.remove()
    assert_restored(pipe, before)


def test_a_pinned_component_may_hold_streamed_blocks_and_resident_parts_when_edited(encoder_case, target):
    # The compiled map pins the DiT's weights outside its blocks; an edit may keep some of them resident.
    pipe = encoder_case.pipe
    dmap = compile_device_map(pipe, "layerwise", target)
    dit = next(name for name, role in dmap.components.items() if role is Role.DIT)
    assert dmap[dit] is Placement.CPU_PINNED
    module = dict(_components(pipe))[dit]
    from offload_map.collect.blocks import get_blocks

    blocks = {path.split(".")[0] for path, _ in get_blocks(module)}
    inner = next(name for name, child in module.named_children() if name not in blocks and any(True for _ in child.parameters()))
    dmap[f"{dit}.{inner}"] = "gpu"
    handle = dispatch_pipeline(pipe, device_map=dmap)
    for _ in range(2):
        assert torch.equal(encoder_case.run(pipe).cpu(), encoder_case.reference)
    assert handle.device_map[f"{dit}.{inner}"] is Placement.GPU
    handle.remove()


@pytest.mark.usefixtures("stream_every_encoder")
def test_calls_that_depart_from_the_last_one_still_give_the_resident_output(encoder_case, target):
    # Each encoder run on its own between calls, under inference mode and outside it, then whole calls again: the
    # encoders' slots came onto the device under inference mode and stay for the next forward (under no_grad).
    pipe = encoder_case.pipe
    handle = dispatch_pipeline(pipe, "layerwise", target, window=2)
    roles = dict(handle.device_map.components)
    modules = dict(_components(pipe))
    seen = {}

    def keep(name):
        def hook(module, args, kwargs, output):
            seen.setdefault(name, (args, kwargs, output[0]))

        return hook

    _calls_with(
        encoder_case, [modules[n].register_forward_hook(keep(n), with_kwargs=True) for n in roles if roles[n] is Role.ENCODER], 2
    )
    for _ in range(2):
        for name, (args, kwargs, output) in seen.items():
            with torch.inference_mode():
                assert torch.equal(modules[name](*args, **kwargs)[0], output), name
    for _ in range(2):
        assert torch.equal(encoder_case.run(pipe).cpu(), encoder_case.reference)
    handle.remove()


@pytest.mark.parametrize("strategy", ["layerwise", "model"])
def test_an_encoders_weights_stay_on_the_device_for_a_pipeline_using_them_after_its_forward(target, strategy):
    # diffusers' clip_skip runs the text encoder's final norm after its forward returned. A version that brought the
    # next component in (evicting the encoder) as soon as an encoder's forward returned broke that from the second
    # call on: the norm ran with host weights on device inputs (found on the H200 by a reviewer; reverted).
    from offload_map.demo import TinyPipeline, make_tiny_pipeline

    class ClipSkipLike(TinyPipeline):
        def encode(self, ids):
            return self.text_encoder.layers[2](self.text_encoder(ids))

    def build():
        pipe = ClipSkipLike().eval().requires_grad_(False)
        pipe.load_state_dict(make_tiny_pipeline().state_dict())
        return pipe

    pipe = build()
    reference = resident_run(pipe, lambda: pipe("a red cat", steps=3), target)
    handle = dispatch_pipeline(pipe, strategy, target)
    seen = []
    pipe.text_encoder.layers[2].register_forward_pre_hook(lambda *_: seen.append("text_encoder" in handle.on_device()))
    for _ in range(3):
        assert torch.equal(pipe("a red cat", steps=3).cpu(), reference)
    assert seen == [True] * 6  # in each call, inside the forward and after it
    handle.remove()
