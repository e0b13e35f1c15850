"""LoRA through diffusers/peft on a dispatched pipeline: adding or deleting an adapter replaces modules,
which is detected (forwards refused with the fix) until ``handle.refresh()`` re-packs the pipeline; fusing
changes weights in place, which ``refresh()`` copies into the host storage. Outputs then equal the resident
model with the same change."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from offload_map import dispatch_pipeline

from conftest import resident_run
from tiny_pipelines import make_flux_pipeline, run_flux

CONFIG = dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


def add_lora(pipe, like=None) -> None:
    """A LoRA adapter on the transformer; with ``like``, the same values as ``like``'s adapter."""
    torch.manual_seed(0)
    pipe.transformer.add_adapter(LoraConfig(**CONFIG))
    if like is not None:
        theirs = dict(like.transformer.named_parameters())
        with torch.no_grad():
            for name, param in pipe.transformer.named_parameters():
                if "lora_" in name:
                    param.copy_(theirs[name])


@pytest.mark.parametrize("strategy", ["layerwise", "model"])
def test_a_lora_added_while_dispatched_is_refused_until_refresh_then_matches_resident(target, strategy):
    pipe, twin = make_flux_pipeline(), make_flux_pipeline()
    add_lora(twin)
    reference = resident_run(twin, lambda: run_flux(twin), target)
    handle = dispatch_pipeline(pipe, strategy, target)
    run_flux(pipe)
    add_lora(pipe, like=twin)
    with pytest.raises(RuntimeError, match=r"modules changed since dispatch \(68 tensors added, 34 removed.*handle.refresh\(\)"):
        run_flux(pipe)
    handle.refresh()
    for _ in range(2):
        assert torch.equal(run_flux(pipe).cpu(), reference)
    # Deleting the adapter changes the modules again: back to the model without it.
    plain = make_flux_pipeline()
    without = resident_run(plain, lambda: run_flux(plain), target)
    pipe.transformer.delete_adapters("default")
    handle.refresh()
    assert torch.equal(run_flux(pipe).cpu(), without)
    handle.remove()


def test_fusing_a_lora_while_dispatched_is_picked_up_by_refresh(target):
    pipe, twin = make_flux_pipeline(), make_flux_pipeline()
    add_lora(twin)
    add_lora(pipe, like=twin)
    twin.transformer.fuse_lora()
    reference = resident_run(twin, lambda: run_flux(twin), target)
    handle = dispatch_pipeline(pipe, "layerwise", target)
    run_flux(pipe)  # some blocks now sit in slots: fusing changes them there
    pipe.transformer.fuse_lora()
    handle.refresh()
    for _ in range(2):
        out = run_flux(pipe).cpu()
        # Where a block sat on the GPU when fused, its merge ran there: the same math, another kernel.
        assert torch.equal(out, reference) if target == "cpu" else torch.allclose(out, reference, atol=1e-5)
    handle.remove()
