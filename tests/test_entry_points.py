"""Components that pipelines run through methods other than ``forward`` (``vae.decode``, ``get_text_features``): the
component is on the device for them as for a forward, and takes its turn with the others."""

from __future__ import annotations

import pytest
import torch

from offload_map import dispatch_pipeline
from offload_map.demo import make_tiny_pipeline

from conftest import resident_run


class DecodeOnlyVAE(torch.nn.Module):
    """A VAE that pipelines call through ``decode``, never ``forward`` (as vllm-omni's own models are)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(latents.transpose(1, -1)).tanh()

    def forward(self, latents):
        raise AssertionError("this VAE is only ever called through decode")


class DeclaredVAE(DecodeOnlyVAE):
    _offload_map_entry_points = ["decode_latents"]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents) * 2


@pytest.mark.parametrize("strategy", ["model", "layerwise"])
@pytest.mark.parametrize("vae_class, method", [(DecodeOnlyVAE, "decode"), (DeclaredVAE, "decode_latents")])
def test_a_component_called_through_another_method_is_on_the_device_for_it(target, strategy, vae_class, method):
    pipe = make_tiny_pipeline()
    pipe.vae = vae_class().requires_grad_(False)
    latents, x, t = torch.randn(1, 4, 8, 8), torch.randn(1, 64, 4), torch.tensor(0.5)
    context = torch.randn(1, 16, 32)
    with torch.no_grad():
        reference = resident_run(pipe.vae, lambda: getattr(pipe.vae, method)(latents.to(target)), target)
        handle = dispatch_pipeline(pipe, strategy, target)
        seen = []
        probe = pipe.vae.proj.register_forward_pre_hook(lambda *_: seen.append(handle.on_device()))
        pipe.transformer(x, t, context)  # the DiT ran last: the VAE took its turn off the device
        out = getattr(pipe.vae, method)(latents)
        probe.remove()
    assert torch.equal(out.cpu(), reference)
    assert "vae" in seen[0] and (strategy != "model" or "transformer" not in seen[0])
    handle.remove()
    assert method not in pipe.vae.__dict__, "the wrapped entry point is gone after remove()"


def test_an_entry_point_set_on_the_instance_is_wrapped_and_put_back(target):
    pipe = make_tiny_pipeline()
    pipe.vae = DecodeOnlyVAE().requires_grad_(False)
    own = pipe.vae.decode
    pipe.vae.decode = lambda latents: own(latents) * 2  # a user's patch of one instance
    patched = pipe.vae.decode
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        reference = resident_run(pipe.vae, lambda: pipe.vae.decode(latents.to(target)), target)
        handle = dispatch_pipeline(pipe, "model", target)
        assert pipe.vae.decode is not patched
        assert torch.equal(pipe.vae.decode(latents).cpu(), reference)
    handle.remove()
    assert pipe.vae.decode is patched


def test_an_entry_point_of_a_component_whose_modules_changed_is_refused_until_refresh(target):
    pipe = make_tiny_pipeline()
    pipe.vae = DecodeOnlyVAE().requires_grad_(False)
    latents = torch.randn(1, 4, 8, 8)
    handle = dispatch_pipeline(pipe, "model", target)
    pipe.vae.proj = torch.nn.Linear(4, 3).requires_grad_(False)  # a module replaced, as loading a LoRA does
    with torch.no_grad():
        reference = pipe.vae.proj(latents.transpose(1, -1)).tanh()
        with pytest.raises(RuntimeError, match=r"vae's modules changed since dispatch.*handle.refresh\(\)"):
            pipe.vae.decode(latents)
        handle.refresh()
        assert torch.allclose(pipe.vae.decode(latents).cpu(), reference, rtol=0, atol=1e-6)
    handle.remove()
