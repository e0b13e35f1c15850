"""The device map: compiled, printed, round-tripped, edited, validated."""

from __future__ import annotations

import json

import pytest
import torch

from offload_map import (
    DeviceMap,
    Placement,
    Role,
    compile_device_map,
    dispatch_pipeline,
)
from offload_map.demo import make_tiny_pipeline


@pytest.fixture
def pipe():
    return make_tiny_pipeline()


def test_layerwise_map_places_blocks_in_the_window_and_the_rest_by_role(pipe):
    dmap = compile_device_map(pipe, "layerwise", "cpu")
    assert dmap.components == {"text_encoder": Role.ENCODER, "transformer": Role.DIT, "vae": Role.VAE}
    # The DiT's weights outside its blocks travel with it, pinned.
    assert dmap["transformer"] is Placement.CPU_PINNED
    assert dmap.paths(Placement.LAYER_WINDOW) == [f"transformer.double_blocks.{i}" for i in range(2)] + [
        f"transformer.single_blocks.{i}" for i in range(3)
    ]
    assert sorted(dmap.paths(Placement.CPU_PINNED)) == ["text_encoder", "transformer", "vae"]
    total = sum(p.numel() * p.element_size() for p in pipe.parameters()) + sum(
        b.numel() * b.element_size() for b in pipe.buffers()
    )
    assert sum(dmap.bytes_by_placement().values()) == total
    assert dmap.entries["transformer.double_blocks.0"].dtype == "float32"


def test_map_prints_a_table_with_collapsed_block_ranges_and_totals(pipe):
    text = str(compile_device_map(pipe, "layerwise", "cpu"))
    assert "transformer.single_blocks.0..2  layer-window  3 x" in text
    assert "totals: gpu" in text and "cpu-pinned" in text


def test_map_round_trips_through_json_and_dict(pipe, tmp_path):
    dmap = compile_device_map(pipe, "model", "cpu")
    assert DeviceMap.from_json(dmap.to_json()) == dmap
    assert DeviceMap.from_dict(json.loads(json.dumps(dmap.to_dict()))) == dmap
    dmap.save(tmp_path / "map.json")
    assert DeviceMap.load(tmp_path / "map.json") == dmap


def test_edited_map_is_honoured_and_stays_bit_exact(pipe):
    reference = pipe("edit me", steps=2)
    dmap = compile_device_map(pipe, "layerwise", "cpu")
    dmap["transformer.double_blocks.1"] = "gpu"
    dmap["text_encoder"] = Placement.GPU
    handle = dispatch_pipeline(pipe, device_map=DeviceMap.from_json(dmap.to_json()))
    assert torch.equal(pipe("edit me", steps=2), reference)
    assert handle.device_map["transformer.double_blocks.1"] is Placement.GPU
    assert "text_encoder" in handle.on_device()
    handle.remove()


def test_accelerate_export_has_disjoint_keys_that_accelerate_accepts(pipe):
    from accelerate.utils import check_device_map

    dmap = compile_device_map(pipe, "layerwise", "cpu")
    dmap.device = "cuda:1"
    exported = dmap.to_accelerate_device_map(pipe)
    assert exported["text_encoder"] == {"": "cpu"}
    assert exported["transformer"]["proj_in"] == "cpu"  # pinned beside the streamed blocks
    dmap["transformer.proj_in"] = "gpu"
    exported = dmap.to_accelerate_device_map(pipe)
    assert exported["transformer"]["proj_in"] == 1
    assert exported["transformer"]["single_blocks.2"] == "cpu"
    for name, component_map in exported.items():
        check_device_map(getattr(pipe, name), component_map)  # raises if a tensor is uncovered
        keys = list(component_map)
        assert not [a for a in keys for b in keys if a != b and (a == "" or b.startswith(a + "."))], "keys overlap"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.entries.pop("vae"), r"covered by no device map entry, e.g. \['vae.decoder.0.weight'"),
        (lambda d: d.__setitem__("transformer.nope", "gpu"), "names no module"),
        (lambda d: d.__setitem__("transformer.proj_in", "layer-window"), "only to blocks"),
        (lambda d: d.__setitem__("transformer.proj_in", "cpu-pinned"), "whole components"),
        (lambda d: d.__setitem__("transformer.double_blocks.0.mlp", "cpu-pinned"), "only 'gpu' entries"),
        (
            lambda d: d.__setitem__("transformer.single_blocks", "gpu"),
            r"'transformer.single_blocks' \('gpu'\) holds no tensor of its own: .* \(del map\['transformer.single_blocks.0'\]",
        ),
    ],
)
def test_invalid_maps_are_rejected_before_anything_moves(pipe, edit, message):
    dmap = compile_device_map(pipe, "layerwise", "cpu")
    edit(dmap)
    weights = {k: v.clone() for k, v in pipe.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        dispatch_pipeline(pipe, device_map=dmap)
    assert all(torch.equal(v, weights[k]) for k, v in pipe.state_dict().items())
    assert not hasattr(pipe, "_offload_map_handle")


def test_uncovered_tensors_are_named(pipe):
    dmap = DeviceMap("cpu", {"text_encoder": "encoder", "transformer": "dit", "vae": "vae"})
    dmap["text_encoder"] = "gpu"
    dmap["vae"] = "gpu"
    dmap["transformer.proj_in"] = "gpu"
    with pytest.raises(ValueError, match=r"covered by no device map entry, e.g. \['transformer.time.weight'"):
        dispatch_pipeline(pipe, device_map=dmap)


def test_map_for_another_model_is_rejected(pipe):
    dmap = compile_device_map(pipe, "model", "cpu")
    other = make_tiny_pipeline()
    other.vae.decoder[0] = torch.nn.Conv2d(4, 8, 3)
    other.vae.decoder[2] = torch.nn.Conv2d(8, 3, 3)
    with pytest.raises(ValueError, match="made for another model"):
        dispatch_pipeline(other, device_map=dmap)


@pytest.mark.parametrize(
    "data, message",
    [
        ({}, "not an offload_map device map"),
        ({"version": 1, "device": "cpu", "window": 2, "components": {"x": "wizard"}, "entries": []}, "unknown role"),
        ({"version": 1, "device": "cpu", "window": 0, "components": {}, "entries": []}, "window must be an int >= 1"),
        (
            {"version": 1, "device": "cpu", "window": 2, "components": {}, "entries": [{"path": "a", "placement": "disk"}]},
            "unknown placement 'disk'",
        ),
        (
            {
                "version": 1,
                "device": "cpu",
                "window": 2,
                "components": {},
                "entries": [{"path": "a", "placement": "gpu", "bytes": -1}],
            },
            "non-negative",
        ),
        (
            {"version": 1, "device": "cpu", "window": 2, "components": {}, "entries": [{"path": "a", "placement": "gpu"}] * 2},
            "appears twice",
        ),
        ({"version": 1, "device": 3, "window": 2, "components": {}, "entries": []}, "'device' must be a str"),
    ],
)
def test_loading_malformed_maps_gives_clear_errors(data, message):
    with pytest.raises(ValueError, match=message):
        DeviceMap.from_dict(data)


def test_unknown_placement_on_edit_lists_the_valid_ones(pipe):
    dmap = compile_device_map(pipe, "model", "cpu")
    with pytest.raises(ValueError, match="expected one of 'gpu', 'cpu-pinned', 'layer-window'"):
        dmap["vae"] = "disk"


def test_a_removed_block_entry_is_an_edit_not_another_model(pipe):
    reference = pipe("edit", steps=2)
    dmap = compile_device_map(pipe, "layerwise", "cpu")
    del dmap["transformer.single_blocks.1"]  # its tensors now belong to 'transformer', pinned
    handle = dispatch_pipeline(pipe, device_map=dmap)
    assert torch.equal(pipe("edit", steps=2), reference)
    assert "transformer.single_blocks.1" not in handle.device_map
    assert handle.device_map["transformer"] is Placement.CPU_PINNED
    assert "transformer.single_blocks.1" not in [u.path for u in handle.runtime.rings["transformer"].units]
    handle.remove()


def test_a_block_list_entry_is_refused_only_where_its_blocks_say_otherwise(pipe):
    reference = pipe("edit", steps=2)
    dmap = compile_device_map(pipe, "layerwise", "cpu")
    blocks = [p for p in dmap.paths() if p.startswith("transformer.single_blocks.")]
    dmap["transformer.single_blocks"] = "gpu"
    for path in blocks:
        dmap[path] = "gpu"  # what the block list says too: harmless
    handle = dispatch_pipeline(pipe, device_map=dmap)
    assert torch.equal(pipe("edit", steps=2), reference)
    handle.remove()
    for path in blocks:
        del dmap[path]  # as the error says: the block list's placement now covers its blocks
    handle = dispatch_pipeline(pipe, device_map=dmap)
    assert torch.equal(pipe("edit", steps=2), reference)
    assert not [p for p in handle.device_map.paths("layer-window") if p.startswith("transformer.single_blocks")]
    handle.remove()


def test_a_pinned_component_moves_what_the_entries_inside_it_do_not_take(pipe):
    # What a budget records when it keeps every block of a streamed DiT (its blocks "gpu", the rest pinned), and a
    # text encoder whose layers a user keeps resident: each dispatches, and the pinned unit moves only the rest.
    reference = pipe("edit", steps=2)
    dmap = compile_device_map(pipe, "layerwise", "cpu")
    for path in dmap.paths("layer-window"):
        dmap[path] = "gpu"
    dmap["text_encoder.layers"] = "gpu"
    handle = dispatch_pipeline(pipe, device_map=dmap)
    assert torch.equal(pipe("edit", steps=2), reference)
    assert not handle.runtime.rings
    moved = {name: {r.qualname for r in unit.tensors} for name, unit in handle.runtime.plan.units.items()}
    assert moved["transformer"] == {f"transformer.{n}" for n, _ in pipe.transformer.named_parameters() if "blocks" not in n}
    assert moved["text_encoder"] == {"text_encoder.embed.weight"}
    handle.remove()
    with pytest.raises(KeyError, match="no device map entry 'transformer.nope'"):
        del dmap["transformer.nope"]


def test_a_misspelled_entry_is_named_with_the_path_it_resembles(pipe):
    dmap = compile_device_map(pipe, "layerwise", "cpu")
    dmap["transformer.singel_blocks.1"] = "gpu"
    with pytest.raises(
        ValueError, match=r"'transformer.singel_blocks.1' names no module.*did you mean 'transformer.single_blocks.1'\?"
    ):
        dispatch_pipeline(pipe, device_map=dmap)
    assert not hasattr(pipe, "_offload_map_handle")


def test_a_map_saved_for_a_gpu_runs_on_the_cpu_when_asked(pipe, tmp_path):
    reference = pipe("device", steps=2)
    dmap = compile_device_map(pipe, "layerwise", "cpu")
    dmap.device = "cuda:0"
    dmap.save(tmp_path / "map.json")
    handle = dispatch_pipeline(pipe, device="cpu", device_map=DeviceMap.load(tmp_path / "map.json"), window=1)
    assert handle.device_map.device == "cpu" and handle.device_map.window == 1
    assert torch.equal(pipe("device", steps=2), reference)
    handle.remove()


def test_a_map_for_a_gpu_compiles_anywhere_and_dispatches_where_asked(pipe, tmp_path):
    # Planning needs no device: a map for cuda:1 is compiled here (with or without a GPU) and saved for that machine.
    dmap = compile_device_map(pipe, "layerwise", "cuda:1", budget=10 * 2**20)
    assert dmap.device == "cuda:1" and dmap.paths("layer-window")
    assert compile_device_map(pipe, "layerwise", "cuda").device == "cuda:0"
    dmap.save(tmp_path / "map.json")
    reference = pipe("device", steps=2)
    handle = dispatch_pipeline(pipe, device="cpu", device_map=DeviceMap.load(tmp_path / "map.json"))
    assert torch.equal(pipe("device", steps=2), reference)
    handle.remove()
    if not torch.cuda.is_available():  # dispatching does need the device
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            dispatch_pipeline(pipe, device_map=dmap)


def test_a_map_for_cuda_without_an_index_targets_this_processs_gpu(pipe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert compile_device_map(pipe, "layerwise", "cuda").device == "cuda:1"  # as dispatch_pipeline resolves it


def test_a_strategy_beside_a_device_map_is_refused_not_ignored(pipe):
    dmap = compile_device_map(pipe, "layerwise", "cpu")
    with pytest.raises(ValueError, match="strategy='model' and device_map= were both given"):
        dispatch_pipeline(pipe, "model", device_map=dmap)
    assert not hasattr(pipe, "_offload_map_handle")


def test_printed_rows_collapse_only_alike_blocks_and_say_what_gpu_means_on_the_cpu(pipe):
    dmap = compile_device_map(pipe, "layerwise", "cpu")
    dmap["transformer.single_blocks.1.mlp"] = "gpu"  # a kept part: its block's row must not fold it in
    text = str(dmap.sized({p: [] for p in dmap.entries}))
    assert "'gpu' means resident there" in text
    table = str(compile_device_map(pipe, "layerwise", "cpu"))
    sizes = {e.nbytes for p, e in compile_device_map(pipe, "layerwise", "cpu").entries.items() if ".double_blocks." in p}
    assert len(sizes) == 1 and "double_blocks.0..1" in table  # alike: collapsed, exact size
    lines = [line for line in str(dmap).splitlines() if "single_blocks" in line]
    assert any("single_blocks.1.mlp" in line for line in lines) and not any("single_blocks.0..2" in line for line in lines)


def test_dispatching_a_component_of_a_dispatched_pipeline_names_offload_map_not_accelerate(pipe):
    handle = dispatch_pipeline(pipe, "layerwise", "cpu")
    with pytest.raises(RuntimeError, match="already dispatched by offload_map as part of another pipeline"):
        dispatch_pipeline(pipe.transformer, "layerwise", "cpu")
    handle.remove()


class _TiedDiT(torch.nn.Module):
    _layerwise_offload_blocks_attrs = ["blocks"]

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
        self.blocks[1].weight = self.proj.weight  # tied: one tensor in a block and outside the blocks


class _Pipe:
    def __init__(self) -> None:
        self.transformer = _TiedDiT()
        self.text_encoder = torch.nn.Linear(4, 4)


def _untie(dit: _TiedDiT) -> None:
    dit.blocks[1].weight = torch.nn.Parameter(dit.proj.weight.detach().clone())


def _share_weight_with_the_encoder(pipe: _Pipe) -> None:
    _untie(pipe.transformer)
    pipe.text_encoder.weight = pipe.transformer.proj.weight


def _share_module_with_the_encoder(pipe: _Pipe) -> None:
    _untie(pipe.transformer)
    pipe.text_encoder = torch.nn.Sequential(pipe.transformer.proj)  # one module registered in two components


@pytest.mark.parametrize("share", [lambda pipe: None, _share_weight_with_the_encoder, _share_module_with_the_encoder])
def test_weights_outside_the_blocks_that_are_used_elsewhere_stay_resident(share):
    # A shared tensor moves once, and must be on the device wherever it is used: resident, it serves every place.
    pipe = _Pipe()
    share(pipe)
    dmap = compile_device_map(pipe, "layerwise", "cpu")
    assert dmap["transformer"] is Placement.GPU
    assert dmap["transformer.blocks.1"] is Placement.LAYER_WINDOW
    x = torch.randn(2, 4)
    with torch.inference_mode():
        reference = pipe.text_encoder(x), pipe.transformer.proj(x)
        handle = dispatch_pipeline(pipe, device_map=dmap)
        assert torch.equal(pipe.text_encoder(x), reference[0]) and torch.equal(pipe.transformer.proj(x), reference[1])
    handle.remove()


def test_weights_outside_the_blocks_used_nowhere_else_travel_with_their_component():
    pipe = _Pipe()
    _untie(pipe.transformer)
    assert compile_device_map(pipe, "layerwise", "cpu")["transformer"] is Placement.CPU_PINNED
    lone = compile_device_map(pipe.transformer, "layerwise", "cpu")
    assert lone[""] is Placement.GPU  # nothing takes turns with a lone DiT: the rest stays resident
