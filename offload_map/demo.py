"""A tiny text-to-image pipeline in plain torch, for the demo and for tests without diffusers.

``TinyPipeline`` has the shape of a real one: a text encoder, a DiT whose blocks come in two lists of
different sizes (like Flux's double and single blocks), a VAE decoder, and a ``__call__`` that encodes the
prompt, runs a few denoising steps and decodes. Weights are random (seeded); nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyTextEncoder(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.layers = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.layers(self.embed(ids))


class TinyBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x + context.mean(dim=1, keepdim=True))) * self.scale


class TinyDiT(nn.Module):
    """Two block lists of different widths run one after the other, like Flux's double and single blocks."""

    _layerwise_offload_blocks_attrs = ["double_blocks", "single_blocks"]

    def __init__(self, channels: int = 4, dim: int = 32, double: int = 2, single: int = 3) -> None:
        super().__init__()
        self.proj_in = nn.Linear(channels, dim)
        self.time = nn.Linear(1, dim)
        self.double_blocks = nn.ModuleList(TinyBlock(dim, 4 * dim) for _ in range(double))
        self.single_blocks = nn.ModuleList(TinyBlock(dim, 2 * dim) for _ in range(single))
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(latents) + self.time(t.reshape(1, 1, 1).to(latents.dtype))
        for block in [*self.double_blocks, *self.single_blocks]:
            x = block(x, context)
        return self.proj_out(x)


class TinyVAE(nn.Module):
    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.decoder = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 3, 3, padding=1))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents).tanh()


class TinyPipeline(nn.Module):
    """Prompt -> image in a few Euler steps. Call it like a diffusers pipeline: ``pipe("a cat", steps=4)``."""

    def __init__(self) -> None:
        super().__init__()
        self.text_encoder = TinyTextEncoder()
        self.transformer = TinyDiT()
        self.vae = TinyVAE()

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """The prompt's token ids -> the context the DiT attends to."""
        return self.text_encoder(ids)

    @torch.no_grad()
    def __call__(self, prompt: str, steps: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
        device = getattr(self.transformer, "_hf_hook", None)
        device = device.execution_device if device is not None else self.transformer.proj_in.weight.device
        ids = torch.tensor([list(prompt.encode()[:16])], device=device)
        context = self.encode(ids)
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, size * size, 4, generator=gen).to(device)
        for i in range(steps):
            t = torch.tensor(1.0 - i / steps, device=device)
            latents = latents - self.transformer(latents, t, context) / steps
        image = latents.transpose(1, 2).reshape(1, 4, size, size)
        return self.vae(image).cpu()


def make_tiny_pipeline(seed: int = 0) -> TinyPipeline:
    """A ``TinyPipeline`` with seeded random weights, in eval mode, on the CPU."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyPipeline().eval().requires_grad_(False)
