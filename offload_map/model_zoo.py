"""Full-size diffusers transformers with random weights, and their inputs: for benchmarks and profiles.

Models are built without a checkpoint: the module tree is created with its parameters on the meta
device (buffers that ``__init__`` computes, such as SD3's ``pos_embed``, stay real), then every
parameter is materialised in bfloat16 from one seeded generator. With CUDA present the numbers are
drawn on the GPU (fast) and copied to CPU memory, so the finished model sits in host memory like a
freshly loaded checkpoint. The same seed always gives the same weights on the same kind of device,
so the model can be rebuilt between strategies instead of being restored.

Names understood by :func:`resolve_spec`:

* ``flux-12b``      FLUX.1-dev transformer config (~11.9 B parameters, ~23.8 GB in bf16)
* ``sd35-medium``   SD3.5-medium transformer config (~2.5 B parameters)
* ``tiny-flux``     a few-hundred-kB Flux for CPU smoke runs
* ``wan-14b``       Wan2.1/2.2 T2V-14B transformer config (one of Wan2.2's two experts, ~14 B parameters); its
  ``resolution`` is the frame height, frames of 16:9-ish 480x832 shape, ``WAN_FRAMES`` frames
* ``tiny-wan``      a small Wan transformer for CPU smoke runs
* ``path/to/config.json``  any diffusers transformer config; the class comes from ``_class_name``
  (inputs can be made for Flux- and SD3-style transformers only)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .collect.blocks import get_blocks_attr_names

DTYPE = torch.bfloat16

FLUX_DEV_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

SD35_MEDIUM_CONFIG = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}

TINY_FLUX_CONFIG = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 24,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}

WAN_14B_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

TINY_WAN_CONFIG = {
    **WAN_14B_CONFIG,
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 32,
    "freq_dim": 16,
    "ffn_dim": 32,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}

# A short clip: 17 frames are 5 latent frames (the Wan VAE's temporal factor is 4, plus the first frame).
WAN_FRAMES = 17

# Families we know how to feed; the value is the default text length of the real pipeline.
FAMILY_BY_CLASS = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3", "WanTransformer3DModel": "wan"}
DEFAULT_TEXT_LEN = {"flux": 512, "sd3": 333, "wan": 512}


@dataclass
class ModelSpec:
    name: str
    class_name: str
    config: dict = field(repr=False)
    resolution: int = 1024
    text_len: int | None = None

    @property
    def family(self) -> str | None:
        return FAMILY_BY_CLASS.get(self.class_name)


REGISTRY = {
    "flux-12b": ModelSpec("flux-12b", "FluxTransformer2DModel", FLUX_DEV_CONFIG),
    "sd35-medium": ModelSpec("sd35-medium", "SD3Transformer2DModel", SD35_MEDIUM_CONFIG),
    # 128 px -> 8x8 packed latent tokens; 16 text tokens.
    "tiny-flux": ModelSpec("tiny-flux", "FluxTransformer2DModel", TINY_FLUX_CONFIG, resolution=128, text_len=16),
    "wan-14b": ModelSpec("wan-14b", "WanTransformer3DModel", WAN_14B_CONFIG, resolution=480),
    "tiny-wan": ModelSpec("tiny-wan", "WanTransformer3DModel", TINY_WAN_CONFIG, resolution=64, text_len=8),
}


def resolve_spec(name_or_path: str, resolution: int | None = None, text_len: int | None = None) -> ModelSpec:
    """A registry name, or a path to a diffusers ``config.json`` (class read from ``_class_name``)."""
    if name_or_path in REGISTRY:
        base = REGISTRY[name_or_path]
        spec = ModelSpec(base.name, base.class_name, dict(base.config), base.resolution, base.text_len)
    elif os.path.isfile(name_or_path):
        with open(name_or_path) as f:
            config = json.load(f)
        if "_class_name" not in config:
            raise ValueError(f"{name_or_path}: no _class_name in config")
        stem = os.path.splitext(os.path.basename(name_or_path))[0]
        name = os.path.basename(os.path.dirname(os.path.abspath(name_or_path))) if stem == "config" else stem
        spec = ModelSpec(name or stem, config["_class_name"], config)
    else:
        raise ValueError(f"unknown model {name_or_path!r}: use one of {sorted(REGISTRY)} or a config.json path")
    if resolution is not None:
        spec.resolution = resolution
    if text_len is not None:
        spec.text_len = text_len
    if spec.text_len is None and spec.family is not None:
        spec.text_len = DEFAULT_TEXT_LEN[spec.family]
    return spec


def build_meta_model(spec: ModelSpec) -> nn.Module:
    """Instantiate ``spec`` with meta parameters and real (CPU) buffers; no weight init runs."""
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, spec.class_name, None)
    if cls is None:
        raise ValueError(f"diffusers {diffusers.__version__} has no class {spec.class_name}")
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(spec.config)
    return model.eval()


def _init_values(name: str, shape: torch.Size, gen: torch.Generator, device: str, std: float) -> torch.Tensor:
    values = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std)
    if len(shape) == 1 and name.endswith("weight"):
        values.add_(1.0)  # norm scales around one, like a trained model's
    return values.to(DTYPE)


def materialize_(model: nn.Module, seed: int, std: float = 0.02, gen_device: str = "cpu") -> None:
    """Give every meta parameter seeded bf16 values in CPU memory; cast float buffers to bf16.

    Weights are N(0, std) (norm scales 1 + N(0, std)), drawn in one pass over ``named_parameters()``
    from a single generator on ``gen_device``, so a rebuild with the same seed is bit-identical.
    """
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        values = _init_values(name, param.shape, gen, gen_device, std).to("cpu")
        modules[owner_name]._parameters[leaf] = nn.Parameter(values, requires_grad=param.requires_grad)
    for name, buf in model.named_buffers():
        owner_name, _, leaf = name.rpartition(".")
        if buf.is_meta:
            raise RuntimeError(f"buffer {name} is on meta; it must be computed in __init__")
        if buf.is_floating_point():
            modules[owner_name]._buffers[leaf] = buf.to(DTYPE)


def build_model(spec: ModelSpec, seed: int, std: float = 0.02, gen_device: str = "cpu") -> nn.Module:
    """Meta build plus :func:`materialize_`; the result lives in (pageable) CPU memory."""
    model = build_meta_model(spec)
    materialize_(model, seed, std, gen_device)
    return model


def fingerprint(model: nn.Module, per_tensor: int = 64) -> torch.Tensor | None:
    """The first few values of every parameter and buffer, on CPU; None if any tensor is on meta."""
    parts = []
    for _, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            return None
        parts.append(t.detach().reshape(-1)[:per_tensor].to("cpu", torch.float32))
    return torch.cat(parts) if parts else torch.empty(0)


def tensor_numel(module: nn.Module) -> int:
    """Elements in ``module``'s parameters and buffers (shared tensors counted once); works on meta."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def block_attr_names(model: nn.Module) -> list[str]:
    """The model's block lists, as offload_map finds them (``collect.blocks``)."""
    return get_blocks_attr_names(model)


def block_stats(model: nn.Module) -> dict:
    """Streamed bytes (all block lists), the largest block and the whole model, in bf16 bytes."""
    attrs = block_attr_names(model)
    sizes = [tensor_numel(blk) * DTYPE.itemsize for attr in attrs for blk in getattr(model, attr)]
    return {
        "block_attrs": attrs,
        "num_blocks": len(sizes),
        "block_bytes": sum(sizes),
        "largest_block_bytes": max(sizes, default=0),
        "model_bytes": tensor_numel(model) * DTYPE.itemsize,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def _flux_inputs(cfg, spec: ModelSpec, device, gen: torch.Generator) -> dict:
    side = spec.resolution // 16  # VAE /8, then 2x2 packing
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    inputs = {
        "hidden_states": torch.randn(1, side * side, cfg.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(1, spec.text_len, cfg.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        "timestep": torch.tensor([0.75]),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(spec.text_len, 3),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    return {k: v.to(device, DTYPE) for k, v in inputs.items()}


def _sd3_inputs(cfg, spec: ModelSpec, device, gen: torch.Generator) -> dict:
    side = spec.resolution // 8
    inputs = {
        "hidden_states": torch.randn(1, cfg.in_channels, side, side, generator=gen),
        "encoder_hidden_states": torch.randn(1, spec.text_len, cfg.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        "timestep": torch.tensor([750.0]),
    }
    return {k: v.to(device, DTYPE) for k, v in inputs.items()}


def _wan_inputs(cfg, spec: ModelSpec, device, gen: torch.Generator) -> dict:
    # Latents of WAN_FRAMES frames of resolution x (resolution * 13 / 7.5) pixels (480x832), VAE /8 and 4x in time.
    height, width = spec.resolution // 8, round(spec.resolution * 832 / 480) // 8
    frames = (WAN_FRAMES - 1) // 4 + 1
    inputs = {
        "hidden_states": torch.randn(1, cfg.in_channels, frames, height, width, generator=gen),
        "encoder_hidden_states": torch.randn(1, spec.text_len, cfg.text_dim, generator=gen),
        "timestep": torch.tensor([750.0]),
    }
    return {k: v.to(device, DTYPE) for k, v in inputs.items()}


def make_inputs(spec: ModelSpec, model: nn.Module, device, seed: int) -> dict:
    """Seeded bf16 forward kwargs for one denoising step at ``spec.resolution`` (batch 1)."""
    gen = torch.Generator().manual_seed(seed)
    if spec.family == "flux":
        return _flux_inputs(model.config, spec, device, gen)
    if spec.family == "sd3":
        return _sd3_inputs(model.config, spec, device, gen)
    if spec.family == "wan":
        return _wan_inputs(model.config, spec, device, gen)
    raise ValueError(f"no input recipe for {spec.class_name}; supported: {sorted(FAMILY_BY_CLASS)}")


def describe_inputs(inputs: dict) -> dict:
    return {k: list(v.shape) for k, v in inputs.items()}
