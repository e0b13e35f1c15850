"""Time whole pipeline calls under several offload strategies: encoders, DiT and VAE, through the pipeline's own
``__call__``, all strategies in one process on one machine.

Usage (GPU)::

    python benchmarks/pipeline_time.py --out DIR [--pipeline flux|wan22] [--strategies resident,layerwise,...]

Usage (no GPU, checks the script on a tiny pipeline)::

    python benchmarks/pipeline_time.py --out DIR --cpu-smoke [--pipeline wan22]

Pipelines, built with random bf16 weights (N(0, 0.02), norm scales 1 + N(0, 0.02)) and word-level tokenizers built
in code (nothing is downloaded), rebuilt from the same seed before every strategy:

- ``flux``: a full-size ``FluxPipeline`` (CLIP-L, T5-XXL 4.8B, Flux-12B, the Flux VAE); 1024x1024, guidance 3.5,
  512 text tokens; a full call is 28 steps.
- ``wan22``: a full-size Wan2.2 T2V-A14B ``WanPipeline`` (UMT5-XXL, two 14B experts switching at
  ``boundary_ratio`` 0.875, the Wan VAE); a 17-frame 480x832 clip, classifier-free guidance (two forwards per step),
  512 text tokens; a full call is 40 steps. The 1-step call runs the high-noise expert only; the longer one both.

Each strategy: setup, a warm-up call of 2 steps (two for ``auto`` budgets, which calibrate their DiT in the first
and streamed encoders in the second), then a 1-step and an 8-step call: per step = (t8 - t1) / 7, fixed part
(encoding, decoding, swaps) = t1 - per step, a full call = fixed + steps x per step. Peak GPU memory is the
allocator's peak over the timed calls, also per component (``PhasePeaks``); host RSS is read after setup (after ``malloc_trim``) and sampled for its
peak during setup and the calls. Every output is compared with the resident run's, bit for bit. A strategy that
would need more host memory than is available (``HOST_NEED``, measured with Flux) is recorded as skipped rather
than let the kernel's OOM killer end the run.

Strategies: ``resident`` (``pipe.to``), ``layerwise`` and ``model`` (``dispatch_pipeline``), ``auto-<N>GiB``
(``dispatch_pipeline(pipe, "auto", max_memory={0: "<N>GiB"}, runs_per_call=<a full call's forwards>)``, as a
user's first call, a full one, would teach it; its row gives the planner's prediction for the components it
plans, ``OffloadHandle.predicted_call_s``), each of these offload_map ones with ``-lossless``
or ``-fp8`` (``compression=``; e.g. ``layerwise-fp8``; every row gives the output's PSNR against resident bf16),
and ``-lossless-folder`` (``offload_folder=`` a new folder in the working directory, on disk where ``/tmp`` may be
tmpfs: the pipeline is built in memory, so without it its coded blocks keep their raw bytes too),
``diffusers-model`` (``enable_model_cpu_offload``),
``diffusers-group`` (``enable_group_offload``, block_level, one block per group, ``use_stream=True``),
``diffusers-sequential`` (``enable_sequential_cpu_offload``; slow: one 1-step and one 2-step call).

A full-size Wan2.2 run takes longer than one device call may: split its strategies over runs that share
``--reference FILE`` (the first with ``resident``) and ``--append``.

Writes ``DIR/pipeline_time_<pipeline>.jsonl`` (an environment row, one row per strategy, appended as they finish)
and ``DIR/pipeline_time_<pipeline>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from offload_map import model_zoo  # noqa: E402
from offload_map.mapping.sizes import human_bytes  # noqa: E402

from step_time import RssSampler, host_info, read_status_bytes, release_host_and_device_memory, versions  # noqa: E402

GIB = 2**30
DEFAULT_STRATEGIES = "resident,layerwise,auto-8GiB,auto-12GiB,auto-24GiB,diffusers-group,diffusers-model"
PROMPT = "a photo of a red cat sitting in the forest at night"
NEGATIVE_PROMPT = "blurry dark picture"
# Host memory a strategy holds at its peak, in weights: diffusers' group offload peaked at 2.15x with Flux (73.3 GB
# for 34 GB), beside offload_map's 1.19x; the rest stay near 1.1x (diffusers-sequential: 36.0 GB, 1.06x).
HOST_NEED = {"diffusers-group": 2.2}
# What a compressed row holds beside the raw bytes, in weights: the code (lossless 0.75x; fp8 about half).
CODE_NEED = {"lossless": 0.8, "fp8": 0.6}
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
)
WORDS = (
    "a an the of and with in on at to photo picture cat dog bird red green blue big small sitting running "
    "forest city beach river night day sky"
).split()


def _tokenizer(kind: str, length: int):
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if kind == "clip":
        tokens = ["<|unk|>", *WORDS, "<|startoftext|>", "<|endoftext|>"]
        special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|unk|>")
        template = "<|startoftext|> $A <|endoftext|>"
    else:
        tokens = ["<pad>", "</s>", "<unk>", *WORDS]
        special = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        template = "$A </s>"
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=special["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in template.split() if t in vocab]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=length, **special)


def flux_configs(tiny: bool) -> dict:
    """Constructor configs of the four models: the real FLUX.1-dev ones, or tiny ones for ``--cpu-smoke``."""
    if tiny:
        return {
            "clip": dict(
                vocab_size=49408,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=32,
            ),
            "t5": dict(vocab_size=32128, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu"),
            "flux": dict(model_zoo.TINY_FLUX_CONFIG, joint_attention_dim=32, pooled_projection_dim=32, in_channels=64),
            "vae": dict(
                in_channels=3,
                out_channels=3,
                latent_channels=16,
                block_out_channels=(8, 16),
                layers_per_block=1,
                norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
                use_quant_conv=False,
                use_post_quant_conv=False,
                scaling_factor=0.3611,
                shift_factor=0.1159,
            ),
        }
    return {
        "clip": dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
        "t5": T5_XXL,
        "flux": dict(model_zoo.FLUX_DEV_CONFIG),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        ),
    }


def _materialized(builders: dict[str, Callable], seed: int, gen_device: str) -> dict:
    """Each model built on the meta device, then given seeded random bf16 weights in CPU memory."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        parts = {name: build() for name, build in builders.items()}
    for offset, module in enumerate(parts.values()):
        model_zoo.materialize_(module, seed + offset, gen_device=gen_device)
        if any(p.is_meta for p in module.parameters()):
            raise RuntimeError(f"{type(module).__name__} kept meta parameters after materialising")
        module.eval().requires_grad_(False)
    return parts


def build_flux(tiny: bool, gen_device: str, seed: int = 0):
    """The FluxPipeline with seeded random bf16 weights in CPU memory (see the module docstring)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = flux_configs(tiny)
    builders = {
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**cfg["clip"])),
        "text_encoder_2": lambda: T5EncoderModel(T5Config(**cfg["t5"])),
        "transformer": lambda: FluxTransformer2DModel(**cfg["flux"]),
        "vae": lambda: AutoencoderKL(**cfg["vae"]),
    }
    parts = _materialized(builders, seed, gen_device)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(scheduler=scheduler, tokenizer=_tokenizer("clip", 77), tokenizer_2=_tokenizer("t5", 512), **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_flux(pipe, steps: int, tiny: bool) -> torch.Tensor:
    size = 64 if tiny else 1024
    out = pipe(
        PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=3.5,
        max_sequence_length=32 if tiny else 512,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="pt",
    )
    return out.images


def wan22_configs(tiny: bool) -> dict:
    """Constructor configs of Wan2.2 T2V-A14B's models (UMT5-XXL, each expert, the Wan VAE), or tiny ones."""
    if tiny:
        return {
            "umt5": dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"),
            "expert": dict(model_zoo.TINY_WAN_CONFIG, in_channels=8, out_channels=8),
            "vae": dict(
                base_dim=4,
                z_dim=8,
                dim_mult=[1, 2, 2],
                num_res_blocks=1,
                attn_scales=[],
                temperal_downsample=[False, True],
                latents_mean=[0.0] * 8,
                latents_std=[1.0] * 8,
                scale_factor_temporal=2,
                scale_factor_spatial=4,
            ),
        }
    return {
        "umt5": dict(T5_XXL, vocab_size=256384),  # UMT5-XXL: T5-XXL's shape with a larger vocabulary
        "expert": dict(model_zoo.WAN_14B_CONFIG),
        "vae": {},  # AutoencoderKLWan's defaults are the Wan2.1/2.2-A14B VAE
    }


def build_wan22(tiny: bool, gen_device: str, seed: int = 0):
    """The Wan2.2 WanPipeline with seeded random bf16 weights in CPU memory (see the module docstring)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = wan22_configs(tiny)
    builders = {
        "text_encoder": lambda: UMT5EncoderModel(UMT5Config(**cfg["umt5"])),
        "transformer": lambda: WanTransformer3DModel(**cfg["expert"]),
        "transformer_2": lambda: WanTransformer3DModel(**cfg["expert"]),
        "vae": lambda: AutoencoderKLWan(**cfg["vae"]),
    }
    parts = _materialized(builders, seed, gen_device)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=_tokenizer("t5", 512), scheduler=scheduler, boundary_ratio=0.875, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_wan22(pipe, steps: int, tiny: bool) -> torch.Tensor:
    out = pipe(
        PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        height=32 if tiny else 480,
        width=32 if tiny else 832,
        num_frames=5 if tiny else model_zoo.WAN_FRAMES,
        num_inference_steps=steps,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        max_sequence_length=16 if tiny else 512,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="pt",
    )
    return out.frames


def flux_runs(pipe, steps: int) -> dict[str, int]:
    """How often each component runs in a call of ``steps`` steps."""
    return {"text_encoder": 1, "text_encoder_2": 1, "transformer": steps, "vae": 1}


def wan22_runs(pipe, steps: int) -> dict[str, int]:
    """How often each component runs in a call of ``steps`` steps: the prompt and the negative prompt are encoded,
    and each step runs its expert twice (guidance); the high-noise expert takes the timesteps from the boundary up."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    boundary = pipe.config.boundary_ratio * scheduler.config.num_train_timesteps
    high = sum(1 for t in scheduler.timesteps if t >= boundary)
    return {"text_encoder": 2, "transformer": 2 * high, "transformer_2": 2 * (steps - high), "vae": 1}


@dataclass(frozen=True)
class Kind:
    """One pipeline the benchmark can build and call (see the module docstring)."""

    title: str  # the table's heading
    build: Callable  # (tiny, gen_device, seed) -> pipeline
    call: Callable  # (pipe, steps, tiny) -> output tensor
    full_steps: int  # the steps of a full call, which the table extrapolates to
    runs: Callable  # (pipe, steps) -> component -> forwards in a call (``runs_per_call`` of the auto rows)


KINDS = {
    "flux": Kind(
        "FluxPipeline (CLIP-L, T5-XXL, Flux-12B, VAE), 1024x1024, 512 text tokens", build_flux, call_flux, 28, flux_runs
    ),
    "wan22": Kind(
        "WanPipeline, Wan2.2 T2V-A14B (UMT5-XXL, two 14B experts, Wan VAE), 17 frames of 480x832, CFG, 512 text tokens",
        build_wan22,
        call_wan22,
        40,
        wan22_runs,
    ),
}


def setup(name: str, pipe, device: str, runs: dict[str, int] | None = None):
    """Apply strategy ``name``; returns (undo, the offload_map handle or None). ``runs``: how often each component
    runs in a full call, which budgets plan for (as a user's first call, a full one, would teach them)."""
    import offload_map

    if name == "resident":
        pipe.to(device)
        return (lambda: pipe.to("cpu")), None
    base, _, compression = name.partition("-")
    if base == "auto":
        budget, _, compression = compression.partition("-")
        if not budget[:1].isdigit():
            raise ValueError(f"strategy {name!r} needs a budget: auto-<N>GiB, e.g. auto-12GiB or auto-12GiB-lossless")
    if base in ("layerwise", "model", "auto"):
        if compression not in ("", "lossless", "fp8", "lossless-folder"):
            raise ValueError(f"unknown strategy {name!r}: the suffix may be -lossless, -lossless-folder or -fp8")
        compression, _, where = compression.partition("-")
        # Under the working directory (on disk, where /tmp may be tmpfs); it stays empty: its files have no name.
        folder = tempfile.mkdtemp(prefix="offload_map_folder_", dir=".") if where else None
        budget = {torch.device(device).index or 0 if device != "cpu" else "cpu": budget} if base == "auto" else None
        handle = offload_map.dispatch_pipeline(
            pipe,
            base,
            device,
            max_memory=budget,
            compression=compression or None,
            runs_per_call=runs if base == "auto" else None,
            offload_folder=folder,
        )

        def undo() -> None:
            handle.remove()
            if folder is not None:
                os.rmdir(folder)

        return undo, handle
    if name == "diffusers-model":
        pipe.enable_model_cpu_offload(device=device)
        return pipe.remove_all_hooks, None
    if name == "diffusers-sequential":
        pipe.enable_sequential_cpu_offload(device=device)
        return pipe.remove_all_hooks, None
    if name == "diffusers-group":
        pipe.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=device != "cpu",
        )
        return (lambda: None), None
    raise ValueError(f"unknown strategy {name!r}")


def timed_call(kind: Kind, pipe, steps: int, tiny: bool, cuda: bool) -> tuple[float, torch.Tensor]:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    image = kind.call(pipe, steps, tiny)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, image.cpu()


class PhasePeaks:
    """The allocator's peak while each component ran, over the calls made inside (CUDA only). A pre-forward hook
    on each component, and on the VAE's decoder (diffusers' ``decode`` runs it, not the VAE's forward), ends the
    phase before it: its peak goes to the component that ran, then the peak is reset. The overall peak is the
    largest phase's; what runs between components counts to the one before."""

    def __init__(self, pipe) -> None:
        modules = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
        decoder = getattr(modules.get("vae"), "decoder", None)
        self.modules = [*modules.items(), *([("vae", decoder)] if decoder is not None else [])]
        self.peaks: dict[str, int] = {}
        self.phase = "before"
        self.hooks: list = []

    def __enter__(self) -> "PhasePeaks":
        torch.cuda.reset_peak_memory_stats()
        self.hooks = [m.register_forward_pre_hook(lambda *_, n=name: self._switch(n)) for name, m in self.modules]
        return self

    def _switch(self, name: str) -> None:
        # The allocator's counters are kept on the host at each allocation: reading them needs no synchronisation.
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        self.phase = name

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        self._switch("after")

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of output ``a`` against ``b`` (both in [0, 1]), in dB; inf when they are equal, NaN if either has NaNs."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaNs included (random weights may produce them)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def host_shortfall(name: str, weights_bytes: int) -> str | None:
    """Why strategy ``name`` cannot run in this host's memory (``HOST_NEED``), or None. Called with the pipeline built,
    so the memory it holds is no longer available: only what the strategy needs beyond it must be."""
    code = next((share for kind, share in CODE_NEED.items() if name.endswith(f"-{kind}")), 0.0)
    beyond = (HOST_NEED.get(name, 1.1) + code - 1.0) * weights_bytes
    available = read_status_bytes("MemAvailable", "/proc/meminfo")
    if available is None or beyond <= available:
        return None
    return f"skipped: needs about {beyond / 1e9:.0f} GB of host memory beyond the pipeline, {available / 1e9:.0f} GB available"


def run_strategy(name: str, kind: Kind, args, reference: dict) -> dict:
    cuda = args.device != "cpu"
    tiny = args.cpu_smoke
    row: dict = {"strategy": name}
    gen_device = args.device if cuda else "cpu"
    start = time.perf_counter()
    pipe = kind.build(tiny, gen_device)
    row["build_s"] = time.perf_counter() - start
    row["weights_bytes"] = sum(
        p.numel() * p.element_size() for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()
    )
    # The pipeline itself sits in host memory already: what a strategy needs beyond it must be available.
    shortfall = host_shortfall(name, row["weights_bytes"]) if not tiny else None
    if shortfall:
        del pipe
        return {**row, "error": shortfall}
    sampler = RssSampler()
    with sampler:
        start = time.perf_counter()
        undo, handle = setup(name, pipe, args.device, kind.runs(pipe, kind.full_steps))
        row["setup_s"] = time.perf_counter() - start
        release_host_and_device_memory(False)
        row["rss_after_setup_bytes"] = read_status_bytes("VmRSS")
        sequential = name == "diffusers-sequential"
        # offload_map's budgets calibrate the DiT in the first call and streamed encoders in the second.
        for _ in range(2 if name.startswith("auto-") else 1):
            kind.call(pipe, 1 if sequential else 2, tiny)
        if cuda:
            torch.cuda.synchronize()
        long = 2 if sequential else 8
        with PhasePeaks(pipe) if cuda else contextlib.nullcontext() as phases:
            t1, image1 = timed_call(kind, pipe, 1, tiny, cuda)
            tn, image = timed_call(kind, pipe, long, tiny, cuda)
    step = (tn - t1) / (long - 1)
    row.update(
        t1_s=t1,
        tn_s=tn,
        steps_long=long,
        per_step_s=step,
        fixed_s=t1 - step,
        full_steps=kind.full_steps,
        call_full_s=t1 - step + kind.full_steps * step,
        peak_gpu_bytes=phases.peak if cuda else None,
        # Where the peak is: a budget that fits the DiT's phase can still be exceeded by a VAE's decode.
        peak_gpu_by_phase=phases.peaks if cuda else None,
        rss_peak_bytes=sampler.peak,
    )
    if name == "resident":
        reference.update({1: image1, long: image})
    row["bit_exact"] = (
        same_bits(image1, reference[1]) and (long not in reference or same_bits(image, reference[long])) if reference else None
    )
    row["psnr_db"] = psnr_db(image, reference[long]) if long in reference else None
    if handle is not None:
        row["device_map"] = str(handle.device_map)
        row["explain"] = handle.explain().split("\n\n", 1)[-1] if handle.plans else None
        # The planned components' share of a full call, as the planner weighs it (the DiT once per step).
        row["predicted_planned_s"] = handle.predicted_call_s
        row["planned"] = sorted(handle.plans)
    undo()
    del pipe, handle, undo
    release_host_and_device_memory(cuda)
    return row


def render(env: dict, rows: list[dict]) -> str:
    steps = KINDS[env["pipeline"]].full_steps
    lines = [
        f"# pipeline_time: {KINDS[env['pipeline']].title}"
        + (" (--cpu-smoke: tiny configs and sizes, timings meaningless)" if env.get("smoke") else ""),
        "",
        f"- device: {env['device_name']}; {env['versions']}",
        f"- weights: {human_bytes(next((r['weights_bytes'] for r in rows if 'weights_bytes' in r), 0))} bf16",
        f"- per step = (tN - t1) / (N - 1) from a 1-step and an N-step call (N = 8; 2 for diffusers-sequential); fixed = t1 - "
        f"per step (negative: below the noise of the two calls); {steps}-step = fixed + {steps} x per step; peak GPU: "
        "allocator peak over the timed calls; RSS: after setup / peak",
        "",
        f"| strategy | fixed s | per step s | {steps}-step s | x resident | peak GPU GiB | host RSS GB | setup s | bit-exact "
        "| PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = next((r["call_full_s"] for r in rows if r["strategy"] == "resident" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | error: {r['error'][:80]} | | | | | | | | |")
            continue
        ratio = f"{r['call_full_s'] / base:.2f}" if base else "-"
        gpu = f"{r['peak_gpu_bytes'] / GIB:.1f}" if r["peak_gpu_bytes"] is not None else "-"
        rss = f"{r['rss_after_setup_bytes'] / 1e9:.1f} / {r['rss_peak_bytes'] / 1e9:.1f}"
        lines.append(
            f"| {r['strategy']} | {r['fixed_s']:.3f} | {r['per_step_s']:.3f} | {r['call_full_s']:.2f} | {ratio} | {gpu} | "
            f"{rss} | {r['setup_s']:.2f} | {_exact(r['bit_exact'])} | {_psnr(r.get('psnr_db'))} |"
        )
    phased = [r for r in rows if r.get("peak_gpu_by_phase")]
    if phased:
        lines += ["", "Peak GPU GiB by phase (the component running; what runs between components counts to the one before):"]
        lines += [
            f"- {r['strategy']}: " + ", ".join(f"{name} {peak / GIB:.1f}" for name, peak in r["peak_gpu_by_phase"].items())
            for r in phased
        ]
    predicted = [r for r in rows if r.get("predicted_planned_s") is not None]
    if predicted:
        lines += ["", f"The planner's prediction for a {steps}-step call, in the components it planned:"]
        lines += [
            f"- {r['strategy']}: {r['predicted_planned_s']:.2f} s in {', '.join(r['planned'])} "
            f"(the measured per step and fixed part give {r['call_full_s']:.2f} s for the call, all components)"
            for r in predicted
        ]
    return "\n".join(lines) + "\n"


def _psnr(value: float | None) -> str:
    return "-" if value is None else "inf" if math.isinf(value) else f"{value:.1f}"


def _exact(flag: bool | None) -> str:
    return "-" if flag is None else "yes" if flag else "NO"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES)
    p.add_argument("--pipeline", choices=sorted(KINDS), default="flux")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU: checks the script, no timings")
    p.add_argument("--append", action="store_true", help="add rows to DIR's results of an earlier run of this pipeline")
    p.add_argument(
        "--reference",
        help="a file for the resident outputs: written when 'resident' runs, else read, so that strategies split over "
        "several runs (a run per device call) are still compared with the resident output",
    )
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device = "cpu"
    kind = KINDS[args.pipeline]
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    if "resident" in names:
        names = ["resident"] + [n for n in names if n != "resident"]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"pipeline_time_{args.pipeline}")
    env = {
        "kind": "env",
        "device_name": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
        "versions": versions(),
        "host": host_info(),
        "pipeline": args.pipeline,
        "smoke": args.cpu_smoke,
    }
    rows = []
    if args.append and os.path.exists(stem + ".jsonl"):
        with open(stem + ".jsonl") as f:
            rows = [row for row in map(json.loads, f) if row.get("kind") != "env"]
    else:
        with open(stem + ".jsonl", "w") as f:
            f.write(json.dumps(env) + "\n")
    reference = {}
    if args.reference and "resident" not in names:
        reference = torch.load(args.reference)
    for name in names:
        print(f"{name} ...", flush=True)
        try:
            row = run_strategy(name, kind, args, reference)
        except Exception as exc:  # noqa: BLE001 - recorded in the row; the next strategy still runs
            row = {"strategy": name, "error": f"{type(exc).__name__}: {exc}"}
            release_host_and_device_memory(args.device != "cpu")
        if name == "resident" and args.reference and "error" not in row:
            torch.save(reference, args.reference)
        rows.append(row)
        with open(stem + ".jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(stem + ".md", "w") as f:
            f.write(render(env, rows))
        print(next(line for line in reversed(render(env, rows).splitlines()) if line.startswith(f"| {name} |")), flush=True)
    print(render(env, rows))


if __name__ == "__main__":
    main()
