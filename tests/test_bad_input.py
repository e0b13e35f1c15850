"""Bad input: a clear error, and the pipeline left unchanged and usable."""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import remove_hook_from_module
from torch import nn

from offload_map import apply_sequential_offload, dispatch_pipeline
from offload_map.demo import make_tiny_pipeline


@pytest.fixture
def pipe():
    return make_tiny_pipeline()


def _unchanged(pipe, reference, weights):
    assert not hasattr(pipe, "_offload_map_handle")
    assert all(torch.equal(v, weights[k]) for k, v in pipe.state_dict().items())
    assert not any(hasattr(m, "_hf_hook") for m in pipe.modules())
    assert torch.equal(pipe("check", steps=2), reference)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"strategy": "fastest"}, ValueError, "unknown strategy 'fastest'; expected one of 'none', 'model', 'layerwise'"),
        ({"strategy": "layerwise", "window": 0}, ValueError, "window must be an int >= 1"),
        ({"strategy": "layerwise", "window": 1.5}, ValueError, "window must be an int >= 1"),
        ({"strategy": "layerwise", "window": True}, ValueError, "window must be an int >= 1"),
        ({"device": "cuda:7"}, ValueError, "cuda:7"),
        ({"device": "tpu"}, ValueError, "not a device|targets 'cuda' or 'cpu'"),
        ({"device": "banana:0"}, ValueError, "not a device"),
    ],
)
def test_bad_arguments_raise_and_leave_the_pipeline_alone(pipe, kwargs, error, message):
    reference, weights = pipe("check", steps=2), {k: v.clone() for k, v in pipe.state_dict().items()}
    kwargs.setdefault("device", "cpu")
    with pytest.raises(error, match=message):
        dispatch_pipeline(pipe, **kwargs)
    _unchanged(pipe, reference, weights)


def test_no_modules_is_a_clear_error():
    class Empty:
        scheduler = object()

    with pytest.raises(TypeError, match="holds no nn.Module"):
        dispatch_pipeline(Empty(), "model", "cpu")


def test_dispatching_twice_is_refused_until_removed(pipe):
    reference, weights = pipe("check", steps=2), {k: v.clone() for k, v in pipe.state_dict().items()}
    handle = dispatch_pipeline(pipe, "model", "cpu")
    with pytest.raises(RuntimeError, match="already dispatched.*remove"):
        dispatch_pipeline(pipe, "layerwise", "cpu")
    assert torch.equal(pipe("check", steps=2), reference)
    handle.remove()
    _unchanged(pipe, reference, weights)
    dispatch_pipeline(pipe, "layerwise", "cpu").remove()


def test_remove_twice_is_a_clear_error(pipe):
    handle = dispatch_pipeline(pipe, "layerwise", "cpu")
    handle.remove()
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()


def test_remove_after_detach_says_it_was_detached(pipe):
    handle = dispatch_pipeline(pipe, "layerwise", "cpu")
    handle.detach()
    with pytest.raises(RuntimeError, match="was detached: its hooks are gone and every tensor stays where detach"):
        handle.remove()
    assert "detached" in repr(handle)
    dispatch_pipeline(pipe, "layerwise", "cpu").remove()  # and it dispatches again


def test_another_offloaders_hooks_are_refused(pipe):
    reference = pipe("check", steps=2)
    cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="transformer.* accelerate hook"):
        dispatch_pipeline(pipe, "model", "cpu")
    assert not hasattr(pipe, "_offload_map_handle")
    remove_hook_from_module(pipe.transformer, recurse=True)
    assert torch.equal(pipe("check", steps=2), reference)


def test_a_dit_without_blocks_names_the_class_and_the_declaration():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    holder = nn.Module()
    holder.transformer = Plain()
    with pytest.raises(ValueError, match=r"Plain \(transformer\) has no block lists.*_layerwise_offload_blocks_attrs"):
        dispatch_pipeline(holder, "layerwise", "cpu")
    assert not hasattr(holder, "_offload_map_handle")


def test_a_block_without_parameters_is_refused():
    class DiT(nn.Module):
        _layerwise_offload_blocks_attrs = ["blocks"]

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.GELU()])

    with pytest.raises(ValueError, match=r"block 'blocks.1' holds no parameters"):
        dispatch_pipeline(DiT(), "layerwise", "cpu")


def test_modules_already_on_another_device_are_moved_to_their_placement_and_back(pipe):
    # On a GPU machine: a pipeline whose __init__ already moved its modules to the GPU (Flux2's did).
    target = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(target)
    reference = pipe("check", steps=2)
    handle = dispatch_pipeline(pipe, "layerwise", target)
    assert torch.equal(pipe("check", steps=2), reference)
    handle.remove()
    assert all(p.device.type == torch.device(target).type for p in pipe.parameters())


def test_overlapping_sequential_lists_are_refused(pipe):
    with pytest.raises(ValueError, match="more than once"):
        apply_sequential_offload([pipe.transformer], [pipe.transformer, pipe.vae], torch.device("cpu"))
    with pytest.raises(ValueError, match="at least one module"):
        apply_sequential_offload([], [], torch.device("cpu"))
    assert not any(hasattr(m, "_hf_hook") for m in pipe.modules())


def test_running_out_of_device_memory_during_dispatch_names_the_need_and_rolls_back(pipe, monkeypatch):
    from offload_map.runtime import slots

    reference, weights = pipe("check", steps=2), {k: v.clone() for k, v in pipe.state_dict().items()}

    def no_memory(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(slots.SlotPool, "__init__", no_memory)
    with pytest.raises(torch.OutOfMemoryError, match="this device map needs about .* smaller window"):
        dispatch_pipeline(pipe, "layerwise", "cpu")
    _unchanged(pipe, reference, weights)


def test_an_exception_inside_a_pinned_component_leaves_the_next_call_correct(pipe):
    reference = pipe("check", steps=2)
    handle = dispatch_pipeline(pipe, "model", "cpu")
    original = pipe.vae._old_forward
    pipe.vae._old_forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("decoder failed"))
    with pytest.raises(RuntimeError, match="decoder failed"):
        pipe("check", steps=2)
    pipe.vae._old_forward = original
    assert torch.equal(pipe("check", steps=2), reference)
    handle.remove()
    assert torch.equal(pipe("check", steps=2), reference)


def test_diffusers_group_offloading_is_refused_naming_it():
    from tiny_pipelines import make_flux_pipeline

    pipe = make_flux_pipeline()
    pipe.transformer.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(RuntimeError, match="managed by diffusers' .*offload.* hook"):
        dispatch_pipeline(pipe, "layerwise", "cpu")
    assert not hasattr(pipe, "_offload_map_handle")
    assert not any(hasattr(m, "_hf_hook") for c in pipe.components.values() if isinstance(c, nn.Module) for m in c.modules())
