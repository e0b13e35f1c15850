"""vllm-omni's offloader contract, behaviour by behaviour, as its own tests (upstream tests/diffusion/offloader/)
check it: the collector's lists, block discovery, the backends' lifecycle and placements, the sequential API,
and the configuration surface. Written from the documented behaviour; each test names what it holds."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from offload_map import (
    LayerWiseOffloadBackend,
    ModelLevelOffloadBackend,
    ModuleDiscovery,
    OffloadConfig,
    OffloadStrategy,
    Placement,
    apply_sequential_offload,
    get_offload_backend,
    remove_sequential_offload,
)
from offload_map.demo import make_tiny_pipeline
from offload_map.sequential_backend import sequential_offload_component

from conftest import resident_run

CPU = torch.device("cpu")


# -- the module collector ----------------------------------------------------------------------------------------


class Declared(nn.Module):
    _dit_modules = ["transformer", "wrapper.dit"]
    _encoder_modules = ["text_encoder", "missing_encoder"]
    _vae_modules = ["vae"]
    _resident_modules = ["scheduler_net"]
    _auxiliary_modules = ["safety_checker"]

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Linear(2, 2)
        self.wrapper = nn.Module()
        self.wrapper.dit = nn.Linear(2, 2)
        self.text_encoder = nn.Linear(2, 2)
        self.vae = nn.Linear(2, 2)
        self.scheduler_net = nn.Linear(2, 2)
        self.safety_checker = nn.Linear(2, 2)
        self.undeclared = nn.Linear(2, 2)


def test_the_collector_fills_vllm_omnis_lists_and_skips_a_declared_name_that_does_not_resolve(caplog):
    pipe = Declared()
    with caplog.at_level(logging.WARNING, logger="offload_map"):
        found = ModuleDiscovery.discover(pipe)
    assert found.dit_names == ["transformer", "wrapper.dit"] and found.dits == [pipe.transformer, pipe.wrapper.dit]
    assert found.encoder_names == ["text_encoder"] and found.encoders == [pipe.text_encoder]
    assert found.vaes == [pipe.vae]
    assert found.resident_names == ["scheduler_net"] and found.resident_modules == [pipe.scheduler_net]
    assert found.auxiliary_names == ["safety_checker"] and found.auxiliaries == [pipe.safety_checker]
    assert "missing_encoder" in caplog.text


def test_outermost_dits_drops_a_dit_nested_in_another():
    pipe = nn.Module()
    pipe.transformer = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    pipe.transformer_2 = nn.Linear(2, 2)
    pipe.dit = pipe.transformer[1]
    names, modules = ModuleDiscovery.discover(pipe).outermost_dits()
    assert names == ["transformer", "transformer_2"] and modules == [pipe.transformer, pipe.transformer_2]


# -- block discovery ----------------------------------------------------------------------------------------------


def _dit(attrs=None, legacy=None, **lists):
    namespace = {}
    if attrs is not None:
        namespace["_layerwise_offload_blocks_attrs"] = attrs
    if legacy is not None:
        namespace["_layerwise_offload_blocks_attr"] = legacy
    cls = type("DiT", (nn.Module,), namespace)
    model = cls()
    for name, count in lists.items():
        setattr(model, name, nn.ModuleList(nn.Linear(2, 2) for _ in range(count)))
    return model


@pytest.mark.parametrize(
    "model, names, count",
    [
        (_dit(["blocks"], blocks=3), ["blocks"], 3),
        (
            _dit(["transformer_blocks", "single_transformer_blocks"], transformer_blocks=2, single_transformer_blocks=3),
            ["transformer_blocks", "single_transformer_blocks"],
            5,
        ),
        (_dit(["blocks"], blocks=0), [], 0),
        (_dit(blocks=3), [], 0),
        (_dit(legacy="blocks", blocks=2), ["blocks"], 2),
    ],
)
def test_get_blocks_from_dit_returns_the_declared_blocks_or_nothing(model, names, count):
    found, blocks = LayerWiseOffloadBackend.get_blocks_from_dit(model)
    assert found == names and len(blocks) == count


def test_a_declared_block_attribute_that_does_not_exist_is_an_attribute_error():
    with pytest.raises(AttributeError, match="Attribute 'nope' declared in _layerwise_offload_blocks_attrs does not exist"):
        LayerWiseOffloadBackend.get_blocks_from_dit(_dit(["nope"], blocks=2))


def test_block_names_are_only_what_a_class_declares_and_set_declares_once():
    assert LayerWiseOffloadBackend.get_blocks_attr_names(_dit(blocks=3)) == []  # no heuristic on this surface
    model = _dit(blocks=3)
    LayerWiseOffloadBackend.set_blocks_attr_names(model, ["blocks"])
    assert type(model)._layerwise_offload_blocks_attrs == ["blocks"]
    LayerWiseOffloadBackend.set_blocks_attr_names(model, ["other"])  # the class declares now: left as it is
    assert LayerWiseOffloadBackend.get_blocks_attr_names(model) == ["blocks"]


# -- the backends -------------------------------------------------------------------------------------------------


class OwnOffload(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Linear(2, 2)
        self.calls = []

    def enable_omni_model_cpu_offload(self, *, device, pin_memory, use_hsdp):
        self.calls.append({"device": device, "pin_memory": pin_memory, "use_hsdp": use_hsdp})

    def disable_omni_model_cpu_offload(self):
        self.calls.append("disabled")


def test_model_level_lets_a_pipeline_run_its_own_offload():
    pipe = OwnOffload()
    backend = ModelLevelOffloadBackend(OffloadConfig(OffloadStrategy.MODEL_LEVEL, pin_cpu_memory=False), CPU)
    backend.enable(pipe)
    assert backend.is_enabled() and pipe.calls == [{"device": CPU, "pin_memory": False, "use_hsdp": False}]
    assert not hasattr(pipe.transformer, "_hf_hook")
    backend.disable()
    assert pipe.calls[-1] == "disabled" and not backend.is_enabled()


def test_model_level_without_a_dit_or_without_encoders_warns_and_stays_off(caplog):
    only_encoder, only_dit = nn.Module(), nn.Module()
    only_encoder.text_encoder = nn.Linear(2, 2)
    only_dit.transformer = nn.Linear(2, 2)
    for pipe, message in ((only_encoder, "No DiT/transformer modules found"), (only_dit, "No encoder modules found")):
        backend = ModelLevelOffloadBackend(OffloadConfig(OffloadStrategy.MODEL_LEVEL), CPU)
        with caplog.at_level(logging.WARNING, logger="offload_map"):
            backend.enable(pipe)
        assert message in caplog.text and not backend.is_enabled()
        assert not any(hasattr(m, "_hf_hook") for m in pipe.modules())


def test_model_level_loads_the_encoders_up_front_and_keeps_the_vae_and_resident_modules(target):
    pipe = make_tiny_pipeline()
    reference = resident_run(pipe, lambda: pipe("model level", steps=2), target)
    backend = ModelLevelOffloadBackend(OffloadConfig(OffloadStrategy.MODEL_LEVEL), torch.device(target))
    backend.enable(pipe)
    dmap = backend.handle.device_map
    assert dmap["transformer"] is Placement.CPU_PINNED and dmap["text_encoder"] is Placement.CPU_PINNED
    assert dmap["vae"] is Placement.GPU
    assert "text_encoder" in backend.handle.on_device() and "transformer" not in backend.handle.on_device()
    assert torch.equal(pipe("model level", steps=2), reference)
    backend.disable()


def test_model_level_leaves_components_quantized_by_bitsandbytes_in_place():
    pipe = make_tiny_pipeline()
    pipe._bnb_offload_skip_components = {"text_encoder"}
    backend = ModelLevelOffloadBackend(OffloadConfig(OffloadStrategy.MODEL_LEVEL), CPU)
    backend.enable(pipe)
    assert backend.handle.device_map["text_encoder"] is Placement.GPU
    assert backend.handle.device_map["transformer"] is Placement.CPU_PINNED
    backend.disable()


@pytest.mark.parametrize("components, resident_layers", [(None, 0), (frozenset({"dit", "text_encoder"}), 2)])
def test_layerwise_keeps_encoders_and_vae_unless_told_and_keeps_resident_layers(target, components, resident_layers):
    pipe = make_tiny_pipeline()
    reference = resident_run(pipe, lambda: pipe("layer wise", steps=2), target)
    config = OffloadConfig(OffloadStrategy.LAYER_WISE, components=components, resident_layers=resident_layers)
    backend = LayerWiseOffloadBackend(config, torch.device(target))
    backend.enable(pipe)
    dmap = backend.handle.device_map
    blocks = [p for p in dmap.entries if ".double_blocks." in p or ".single_blocks." in p]
    assert [dmap[p] for p in blocks[:resident_layers]] == [Placement.GPU] * resident_layers
    assert all(dmap[p] is Placement.LAYER_WINDOW for p in blocks[resident_layers:])
    assert dmap["vae"] is Placement.GPU
    # the tiny text encoder has no block lists: asked to stream, it takes turns whole
    assert dmap["text_encoder"] is (Placement.CPU_PINNED if components else Placement.GPU)
    assert torch.equal(pipe("layer wise", steps=2), reference)
    backend.disable()


# -- the sequential API ------------------------------------------------------------------------------------------


def _handle(module):
    return module.__dict__["_offload_map_sequential"]


@pytest.mark.parametrize("offload_initial_dits", [False, True])
def test_sequential_offload_starts_with_the_dit_where_asked_and_offloads_only_the_chosen_modules(target, offload_initial_dits):
    pipe = make_tiny_pipeline()
    reference = resident_run(pipe, lambda: pipe("subset", steps=2), target)
    apply_sequential_offload(
        [pipe.transformer],
        [pipe.text_encoder, pipe.vae],
        torch.device(target),
        offload_initial_dits=offload_initial_dits,
        offload_encoder_modules=[pipe.text_encoder],
    )
    handle = _handle(pipe.transformer)
    assert ("transformer_0" in handle.on_device()) is not offload_initial_dits
    assert handle.device_map["text_encoder_1"] is Placement.GPU  # the VAE was not chosen: it stays
    assert torch.equal(pipe("subset", steps=2), reference)
    remove_sequential_offload([pipe.transformer])


def test_sequential_offload_component_brings_a_module_in_and_lets_it_go_even_on_error(target):
    pipe = make_tiny_pipeline()
    apply_sequential_offload([pipe.transformer], [pipe.text_encoder], torch.device(target))
    handle = _handle(pipe.text_encoder)
    with pytest.raises(KeyError):
        with sequential_offload_component(pipe.text_encoder):
            assert "text_encoder_0" in handle.on_device() and "transformer_0" not in handle.on_device()
            raise KeyError("work failed")
    assert "text_encoder_0" not in handle.on_device()
    with pytest.raises(RuntimeError, match="has no sequential offload hook"):
        with sequential_offload_component(pipe.vae):
            pass
    remove_sequential_offload([pipe.transformer])


def test_unsupported_sequential_options_are_refused_by_name():
    pipe = make_tiny_pipeline()
    with pytest.raises(ValueError, match="persistent_dit_staging=True is not supported"):
        apply_sequential_offload([pipe.transformer], [pipe.text_encoder], CPU, persistent_dit_staging=True)
    with pytest.raises(ValueError, match="in neither list"):
        apply_sequential_offload([pipe.transformer], [pipe.text_encoder], CPU, offload_dit_modules=[pipe.vae])
    assert not any(hasattr(m, "_hf_hook") for m in pipe.modules())


# -- the configuration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, expected",
    [
        (
            {"diffusion_offload_config": {"mode": "layer", "components": ["dit", "text_encoder"]}},
            OffloadConfig(OffloadStrategy.LAYER_WISE, components=frozenset({"dit", "text_encoder"})),
        ),
        (
            {"diffusion_offload_config": {"mode": "module", "components": ["dit", "vae"], "pin_memory": False}},
            OffloadConfig(OffloadStrategy.MODEL_LEVEL, pin_cpu_memory=False, components=frozenset({"dit", "vae"})),
        ),
        (
            {"diffusion_offload_config": {"mode": "layer", "layer_options": {"dit": {"weight_transfer": "allgather"}}}},
            OffloadConfig(OffloadStrategy.LAYER_WISE, components=frozenset({"dit"}), shard_copies=True),
        ),
        (
            {"diffusion_offload_config": {"mode": "layer", "layer_options": {"dit": {"resident_layers": 4}}}},
            OffloadConfig(OffloadStrategy.LAYER_WISE, components=frozenset({"dit"}), resident_layers=4),
        ),
        ({"enable_distributed_layerwise_offload": True}, OffloadConfig(OffloadStrategy.LAYER_WISE, shard_copies=True)),
        (
            {"enable_distributed_layerwise_offload": True, "dlo_use_allgather": False, "dlo_resident_layers": 3},
            OffloadConfig(OffloadStrategy.LAYER_WISE, resident_layers=3),
        ),
        (
            {"layerwise_offload_components": ["dit", "text_encoder"]},
            OffloadConfig(OffloadStrategy.LAYER_WISE, components=frozenset({"dit", "text_encoder"})),
        ),
    ],
)
def test_the_newer_config_surface_maps_onto_offload_maps_features(fields, expected):
    assert OffloadConfig.from_od_config(SimpleNamespace(**fields)) == expected


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"diffusion_offload_config": {"components": ["dit"]}}, "requires 'mode'"),
        ({"diffusion_offload_config": {"mode": "layer", "components": ["vae"]}}, "'vae' component requires mode='module'"),
        ({"diffusion_offload_config": {"mode": "layer", "components": ["unet"]}}, "'components' must name components"),
        (
            {
                "diffusion_offload_config": {
                    "mode": "layer",
                    "layer_options": {"dit": {"weight_transfer": "allgather", "resident_layers": 2}},
                }
            },
            "resident_layers requires dit.weight_transfer='rank-local'",
        ),
        ({"diffusion_offload_config": {"mode": "layer"}, "enable_cpu_offload": True}, "cannot be combined with legacy"),
        ({"enable_distributed_layerwise_offload": True, "dlo_resident_layers": -1}, "dlo_resident_layers must be >= 0"),
        ({"enable_distributed_layerwise_offload": True, "dlo_resident_layers": 2}, "requires --dlo-no-use-allgather"),
        (
            {"enable_distributed_layerwise_offload": True, "parallel_config": SimpleNamespace(use_hsdp=True)},
            "incompatible with HSDP",
        ),
    ],
)
def test_settings_vllm_omni_refuses_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        OffloadConfig.from_od_config(SimpleNamespace(**fields))


def test_a_backend_built_from_the_newer_config_streams_what_it_names(target):
    od = SimpleNamespace(diffusion_offload_config={"mode": "layer", "layer_options": {"dit": {"resident_layers": 1}}})
    backend = get_offload_backend(od, torch.device(target))
    assert isinstance(backend, LayerWiseOffloadBackend)
    pipe = make_tiny_pipeline()
    reference = resident_run(pipe, lambda: pipe("config", steps=2), target)
    backend.enable(pipe)
    assert backend.handle.device_map["transformer.double_blocks.0"] is Placement.GPU
    assert torch.equal(pipe("config", steps=2), reference)
    backend.disable()
