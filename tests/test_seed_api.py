"""vllm-omni's offloader contract: names, config parsing, backends and the sequential helpers."""

from __future__ import annotations

import importlib
import logging
from types import SimpleNamespace

import pytest
import torch

import offload_map
from offload_map import (
    LayerWiseOffloadBackend,
    ModelLevelOffloadBackend,
    OffloadBackend,
    OffloadConfig,
    OffloadStrategy,
    apply_sequential_offload,
    get_offload_backend,
    remove_sequential_offload,
)
from offload_map.demo import make_tiny_pipeline

from conftest import resident_run


def test_contract_names_import_from_the_package_and_the_seed_submodules():
    for name in (
        "OffloadBackend",
        "LayerWiseOffloadBackend",
        "ModelLevelOffloadBackend",
        "OffloadConfig",
        "OffloadStrategy",
        "apply_sequential_offload",
        "get_offload_backend",
        "remove_sequential_offload",
    ):
        assert hasattr(offload_map, name)
    assert importlib.import_module("offload_map.base").OffloadBackend is OffloadBackend
    assert importlib.import_module("offload_map.layerwise_backend").LayerWiseOffloadBackend is LayerWiseOffloadBackend
    assert importlib.import_module("offload_map.sequential_backend").apply_sequential_offload is apply_sequential_offload
    assert hasattr(importlib.import_module("offload_map.module_collector"), "ModuleDiscovery")
    assert LayerWiseOffloadBackend.get_blocks_attr_names(make_tiny_pipeline().transformer) == ["double_blocks", "single_blocks"]
    with pytest.raises(TypeError):
        OffloadBackend(OffloadConfig(), torch.device("cpu"))


@pytest.mark.parametrize(
    "fields, strategy",
    [
        ({}, OffloadStrategy.NONE),
        ({"enable_cpu_offload": True}, OffloadStrategy.MODEL_LEVEL),
        ({"enable_layerwise_offload": True}, OffloadStrategy.LAYER_WISE),
        ({"enable_cpu_offload": True, "enable_layerwise_offload": True}, OffloadStrategy.LAYER_WISE),
    ],
)
def test_from_od_config_reads_the_flags_and_layerwise_wins(fields, strategy, caplog):
    with caplog.at_level(logging.INFO, logger="offload_map"):
        config = OffloadConfig.from_od_config(SimpleNamespace(**fields))
    assert config.strategy is strategy
    assert config.pin_cpu_memory is True and config.use_hsdp is False
    assert ("Layer-wise takes priority" in caplog.text) == (len(fields) == 2)


def test_from_od_config_reads_pinning_and_hsdp():
    od = SimpleNamespace(enable_cpu_offload=True, pin_cpu_memory=False, parallel_config=SimpleNamespace(use_hsdp=True))
    assert OffloadConfig.from_od_config(od) == OffloadConfig(OffloadStrategy.MODEL_LEVEL, False, True)


def test_get_offload_backend_picks_the_backend_or_none(caplog):
    assert get_offload_backend(SimpleNamespace()) is None
    cpu = torch.device("cpu")
    assert isinstance(get_offload_backend(SimpleNamespace(enable_cpu_offload=True), cpu), ModelLevelOffloadBackend)
    assert isinstance(get_offload_backend(SimpleNamespace(enable_layerwise_offload=True), cpu), LayerWiseOffloadBackend)
    if not torch.cuda.is_available():
        with caplog.at_level(logging.WARNING, logger="offload_map"):
            assert get_offload_backend(SimpleNamespace(enable_cpu_offload=True)) is None
        assert "no CUDA device" in caplog.text


@pytest.mark.parametrize("backend_cls", [ModelLevelOffloadBackend, LayerWiseOffloadBackend])
def test_backend_enable_runs_bit_exact_and_disable_removes_hooks_only(backend_cls, target, caplog):
    pipe = make_tiny_pipeline()
    reference = resident_run(pipe, lambda: pipe("seed api", steps=2), target)
    backend = backend_cls(OffloadConfig(OffloadStrategy(backend_cls.strategy)), torch.device(target))
    backend.enable(pipe)
    assert backend.enabled and backend.is_enabled()
    with caplog.at_level(logging.WARNING, logger="offload_map"):
        backend.enable(pipe)  # vllm-omni warns and leaves the enabled backend as it is
    assert f"{backend_cls.__name__} already enabled" in caplog.text and backend.is_enabled()
    assert torch.equal(pipe("seed api", steps=2), reference)
    backend.disable()
    assert not backend.enabled
    assert not any(hasattr(m, "_hf_hook") for m in pipe.modules())
    # disable() leaves modules where they are; moving them is the caller's job
    assert torch.equal(resident_run(pipe, lambda: pipe("seed api", steps=2), target), reference)
    backend.disable()


def test_apply_sequential_offload_makes_dits_and_encoders_exclusive(target):
    pipe = make_tiny_pipeline()
    reference = resident_run(pipe, lambda: pipe("sequential", steps=2), target)
    apply_sequential_offload([pipe.transformer], [pipe.text_encoder, pipe.vae], torch.device(target))
    handle = pipe.transformer.__dict__["_offload_map_sequential"]
    seen = []
    pipe.transformer.register_forward_hook(lambda *_: seen.append(handle.on_device()))
    assert torch.equal(pipe("sequential", steps=2), reference)
    assert seen and all("text_encoder_0" not in on and "text_encoder_1" not in on for on in seen)
    with pytest.raises(RuntimeError, match="already under sequential offload"):
        apply_sequential_offload([pipe.transformer], [], torch.device(target))
    remove_sequential_offload([[pipe.transformer], [pipe.text_encoder, pipe.vae]])
    assert not any(hasattr(m, "_hf_hook") for m in pipe.modules())
    assert torch.equal(resident_run(pipe, lambda: pipe("sequential", steps=2), target), reference)
