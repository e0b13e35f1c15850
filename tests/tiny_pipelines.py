"""Tiny, real diffusers pipelines with random weights, for tests.

Everything here is built in code: model configs, random float32 weights and
word-level tokenizers.  Nothing is read from disk and nothing touches the
Hugging Face Hub, so these builders work offline and take well under a second.

Builders:

* :func:`make_flux_pipeline` -> a :class:`diffusers.FluxPipeline`
* :func:`make_wan22_pipeline` -> a Wan2.2-style :class:`diffusers.WanPipeline`
  with two denoising experts (``transformer`` and ``transformer_2``)

Runners (call the pipeline's own ``__call__`` with fixed, small settings and a
seeded CPU generator, and return the decoded output tensor):

* :func:`run_flux`
* :func:`run_wan22`

Both builders are deterministic in ``seed`` and leave the global torch RNG
state untouched.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from offload_map.demo import TinyPipeline

__all__ = ["make_flux_pipeline", "make_llama_pipeline", "make_wan22_pipeline", "run_flux", "run_llama", "run_wan22"]

# A small closed vocabulary; any other word maps to the unknown token.
_WORDS = (
    "a an the of and with in on at to is are photo picture video painting "
    "cat dog bird fish horse person man woman child tree house car boat "
    "red green blue yellow black white big small old young "
    "running sitting flying swimming walking sleeping "
    "forest city beach river mountain street sky night day"
).split()

FLUX_PROMPT = "a photo of a red cat sitting in the forest"
WAN_PROMPT = "a small dog running on the beach at night"
WAN_NEGATIVE_PROMPT = "blurred old picture"


def _word_level_tokenizer(
    specials_front: list[str],
    specials_back: list[str],
    unk: str,
    template: str,
    model_max_length: int,
    lowercase: bool,
    **special_token_kwargs: str,
) -> PreTrainedTokenizerFast:
    """Wrap a WordLevel ``tokenizers.Tokenizer`` in a ``PreTrainedTokenizerFast``.

    Ids are given in order: ``specials_front``, then the words of ``_WORDS``,
    then ``specials_back``.  ``template`` is a ``TemplateProcessing`` single
    template such as ``"$A </s>"``.
    """
    tokens = list(specials_front) + list(_WORDS) + list(specials_back)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template_specials = [t for t in template.split() if t in vocab]
    tok.post_processor = processors.TemplateProcessing(
        single=template,
        special_tokens=[(t, vocab[t]) for t in template_specials],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        unk_token=unk,
        **special_token_kwargs,
    )


def _clip_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """CLIP-like tokenizer: ``<|startoftext|> words <|endoftext|>``, padded with
    ``<|endoftext|>`` (as the OpenAI CLIP tokenizer used by Flux does).  The
    start/end tokens get the two highest ids, like in the real vocabulary."""
    return _word_level_tokenizer(
        specials_front=["<|unk|>"],
        specials_back=["<|startoftext|>", "<|endoftext|>"],
        unk="<|unk|>",
        template="<|startoftext|> $A <|endoftext|>",
        model_max_length=model_max_length,
        lowercase=True,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def _t5_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """T5/UMT5-like tokenizer: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, appends ``</s>``."""
    return _word_level_tokenizer(
        specials_front=["<pad>", "</s>", "<unk>"],
        specials_back=[],
        unk="<unk>",
        template="$A </s>",
        model_max_length=model_max_length,
        lowercase=False,
        eos_token="</s>",
        pad_token="<pad>",
    )


def _t5_config_kwargs(tokenizer, dim: int) -> dict:
    """A 2-layer T5/UMT5 encoder config of width ``dim`` for ``tokenizer``."""
    return dict(
        vocab_size=len(tokenizer),
        d_model=dim,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _seeded(seed: int, build):
    """Run ``build()`` with the torch RNG seeded to ``seed``, restoring the
    global RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
            component.requires_grad_(False)
    return pipe


# ---------------------------------------------------------------------------
# Flux
# ---------------------------------------------------------------------------

_FLUX_CLIP_LEN = 12  # CLIP tokenizer model_max_length == CLIP positions
_FLUX_T5_LEN = 16  # max_sequence_length passed to the pipeline


def make_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """Build a tiny :class:`diffusers.FluxPipeline` with random float32 weights.

    Components:

    * ``transformer``: :class:`FluxTransformer2DModel` with 2 double-stream
      blocks (``transformer_blocks``) and 3 single-stream blocks
      (``single_transformer_blocks``); 2 heads of dim 16 (inner dim 32),
      RoPE axes (4, 6, 6), guidance embedding on (Flux-dev style).  Double
      and single blocks have different parameter counts.
    * ``text_encoder``: :class:`CLIPTextModel` (hidden 32, 2 layers); its
      pooled output feeds ``pooled_projections``.
    * ``text_encoder_2``: :class:`T5EncoderModel` (d_model 32, 2 layers); its
      hidden states feed ``encoder_hidden_states``.
    * ``tokenizer`` / ``tokenizer_2``: word-level ``PreTrainedTokenizerFast``
      tokenizers built in code (CLIP-like, max length 12; T5-like).
    * ``vae``: :class:`AutoencoderKL` with 4 latent channels, two levels
      (spatial factor 2), no quant convs, Flux-style scaling/shift factors.
    * ``scheduler``: :class:`FlowMatchEulerDiscreteScheduler` with dynamic
      shifting, as Flux uses.

    The same ``seed`` always gives the same weights; each component draws
    from its own seed so the weights don't depend on build order.
    """
    clip_hidden = 32
    t5_dim = 32
    latent_channels = 4

    tokenizer = _clip_tokenizer(_FLUX_CLIP_LEN)
    tokenizer_2 = _t5_tokenizer(512)

    def build_clip():
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=clip_hidden,
            intermediate_size=48,
            projection_dim=clip_hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_FLUX_CLIP_LEN,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return CLIPTextModel(config)

    def build_t5():
        return T5EncoderModel(T5Config(**_t5_config_kwargs(tokenizer_2, t5_dim)))

    def build_transformer():
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=latent_channels * 4,  # 2x2 latent packing
            num_layers=2,
            num_single_layers=3,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_dim,
            pooled_projection_dim=clip_hidden,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )

    def build_vae():
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )

    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_seeded(seed * 10 + 4, build_vae),
        text_encoder=_seeded(seed * 10 + 1, build_clip),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(seed * 10 + 2, build_t5),
        tokenizer_2=tokenizer_2,
        transformer=_seeded(seed * 10 + 3, build_transformer),
    )
    return _finish(pipe)


def run_flux(pipe: FluxPipeline, steps: int = 3) -> torch.Tensor:
    """Run ``pipe`` (from :func:`make_flux_pipeline`) end to end: encode a fixed
    prompt with both text encoders, denoise a 32x32 image (8x8 = 64 packed
    latent tokens) for ``steps`` steps with a fixed-seed CPU generator, decode
    with ``vae.decode``.  Returns the image as a float tensor of shape
    ``(1, 3, 32, 32)`` with values in [0, 1]."""
    generator = torch.Generator(device="cpu").manual_seed(1234)
    out = pipe(
        prompt=FLUX_PROMPT,
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=3.5,
        generator=generator,
        max_sequence_length=_FLUX_T5_LEN,
        output_type="pt",
    )
    return out.images


# ---------------------------------------------------------------------------
# Wan 2.2 (two experts)
# ---------------------------------------------------------------------------

_WAN_TEXT_LEN = 16  # max_sequence_length passed to the pipeline
_WAN_Z_DIM = 8


def make_wan22_pipeline(seed: int = 0) -> WanPipeline:
    """Build a tiny Wan2.2-style :class:`diffusers.WanPipeline` (text-to-video,
    two denoising experts) with random float32 weights.

    Components:

    * ``transformer`` (high-noise expert) and ``transformer_2`` (low-noise
      expert): :class:`WanTransformer3DModel`, 2 heads of dim 12, patch
      (1, 2, 2), blocks in ``.blocks``.  The experts deliberately differ:
      ``transformer`` has 2 blocks with ffn_dim 32, ``transformer_2`` has 3
      blocks with ffn_dim 48, so blocks of one expert are not
      interchangeable with the other's.  Same in/out channels and text dim.
    * ``text_encoder``: :class:`UMT5EncoderModel` (d_model 32, 2 layers).
    * ``tokenizer``: word-level ``PreTrainedTokenizerFast`` built in code.
    * ``vae``: :class:`AutoencoderKLWan` (base_dim 4, z_dim 8, three levels:
      spatial factor 4, temporal factor 2).
    * ``scheduler``: :class:`UniPCMultistepScheduler` with flow sigmas
      (``flow_shift=3``), as Wan uses.
    * ``boundary_ratio=0.875``: timesteps >= 875 go to ``transformer``, the rest
      to ``transformer_2``.  With this scheduler, 4 steps give timesteps
      [999, 900 | 750, 500], i.e. two steps per expert; any ``steps >= 2``
      uses both experts.
    """
    text_dim = 32

    tokenizer = _t5_tokenizer(512)

    def build_umt5():
        return UMT5EncoderModel(UMT5Config(**_t5_config_kwargs(tokenizer, text_dim)))

    def build_expert(num_layers: int, ffn_dim: int):
        def build():
            return WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=2,
                attention_head_dim=12,
                in_channels=_WAN_Z_DIM,
                out_channels=_WAN_Z_DIM,
                text_dim=text_dim,
                freq_dim=16,
                ffn_dim=ffn_dim,
                num_layers=num_layers,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
                rope_max_seq_len=32,
            )

        return build

    def build_vae():
        return AutoencoderKLWan(
            base_dim=4,
            z_dim=_WAN_Z_DIM,
            dim_mult=[1, 2, 2],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True],
            latents_mean=[round(0.1 * i - 0.35, 2) for i in range(_WAN_Z_DIM)],
            latents_std=[round(1.0 + 0.25 * i, 2) for i in range(_WAN_Z_DIM)],
            scale_factor_temporal=2,
            scale_factor_spatial=4,
        )

    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )

    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(seed * 10 + 1, build_umt5),
        vae=_seeded(seed * 10 + 4, build_vae),
        scheduler=scheduler,
        transformer=_seeded(seed * 10 + 2, build_expert(num_layers=2, ffn_dim=32)),
        transformer_2=_seeded(seed * 10 + 3, build_expert(num_layers=3, ffn_dim=48)),
        boundary_ratio=0.875,
    )
    return _finish(pipe)


def run_wan22(pipe: WanPipeline, steps: int = 4) -> torch.Tensor:
    """Run ``pipe`` (from :func:`make_wan22_pipeline`) end to end: encode a
    fixed prompt and negative prompt, denoise a 5-frame 32x32 video (latent
    3x8x8) for ``steps`` steps with classifier-free guidance (two expert
    calls per step; ``transformer`` for the high-noise steps, ``transformer_2``
    for the rest), decode with ``vae.decode``.  Uses a fixed-seed CPU
    generator.  Returns the video as a float tensor of shape
    ``(1, 5, 3, 32, 32)`` (batch, frames, channels, H, W) in [0, 1]."""
    generator = torch.Generator(device="cpu").manual_seed(1234)
    out = pipe(
        prompt=WAN_PROMPT,
        negative_prompt=WAN_NEGATIVE_PROMPT,
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=steps,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        generator=generator,
        max_sequence_length=_WAN_TEXT_LEN,
        output_type="pt",
    )
    return out.frames


# ---------------------------------------------------------------------------
# A decoder-style text encoder
# ---------------------------------------------------------------------------


class LlamaTextPipeline(TinyPipeline):
    """The demo pipeline (``offload_map.demo``) with a decoder-style language model as its text encoder, as
    HunyuanVideo (Llama), Sana (Gemma 2) or Qwen-Image (Qwen2.5-VL) use one: the prompt's last hidden states
    condition the DiT."""

    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        self.text_encoder = LlamaModel(config)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=ids).last_hidden_state


def make_llama_pipeline(seed: int = 0, layers: int = 3) -> LlamaTextPipeline:
    """A ``LlamaTextPipeline`` with seeded random weights, in eval mode."""
    return _seeded(seed, lambda: LlamaTextPipeline(layers).eval().requires_grad_(False))


def run_llama(pipe: LlamaTextPipeline) -> torch.Tensor:
    return pipe("a red cat", steps=3)
