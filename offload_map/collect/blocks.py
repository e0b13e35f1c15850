"""Finding a model's block lists (a DiT's, an encoder's): declared, registered, or inferred.

Resolution order for ``get_blocks_attr_names(model)``:

1. The class attribute ``_layerwise_offload_blocks_attrs`` (vllm-omni's protocol), a list of attribute
   names, dotted for lists inside submodules (``"encoder.block"``); the legacy single-string
   ``_layerwise_offload_blocks_attr`` is read with a deprecation warning.
2. ``KNOWN_BLOCK_ATTRS``, keyed by class name: diffusers' transformers and UNets, and the transformers text and
   image encoders diffusers pipelines use (T5/UMT5 ``encoder.block``, CLIP ``text_model.encoder.layers``,
   decoder-style language models' ``layers``).
3. The heuristic: the ``nn.ModuleList``/``nn.Sequential`` containers of at least two children all of one type,
   each holding at least ``HEURISTIC_MIN_SHARE`` of the parameter bytes, found by descending from the model
   into submodules that hold that share (never into a list already chosen), in registration order, provided
   that together they hold more than half of the bytes (else none).

Every declared or registered name must lead, through registered child modules (``_modules``), to a child
container: a Python ``@property`` or a plain list is an error, never a silent fall-back to moving the whole
model to the device.
"""

from __future__ import annotations

import logging
import warnings

from torch import nn

logger = logging.getLogger("offload_map")

# diffusers class name -> block-list attributes, in execution order.
KNOWN_BLOCK_ATTRS: dict[str, tuple[str, ...]] = {
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "Flux2Transformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "ChromaTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "HunyuanVideoTransformer3DModel": ("transformer_blocks", "single_transformer_blocks"),
    "HunyuanVideoFramepackTransformer3DModel": ("transformer_blocks", "single_transformer_blocks"),
    "SD3Transformer2DModel": ("transformer_blocks",),
    "QwenImageTransformer2DModel": ("transformer_blocks",),
    "LTXVideoTransformer3DModel": ("transformer_blocks",),
    "CogVideoXTransformer3DModel": ("transformer_blocks",),
    "CogView4Transformer2DModel": ("transformer_blocks",),
    "PixArtTransformer2DModel": ("transformer_blocks",),
    "SanaTransformer2DModel": ("transformer_blocks",),
    "AuraFlowTransformer2DModel": ("joint_transformer_blocks", "single_transformer_blocks"),
    "MochiTransformer3DModel": ("transformer_blocks",),
    "AllegroTransformer3DModel": ("transformer_blocks",),
    "StableAudioDiTModel": ("transformer_blocks",),
    "WanTransformer3DModel": ("blocks",),
    "WanVACETransformer3DModel": ("vace_blocks", "blocks"),
    "SkyReelsV2Transformer3DModel": ("blocks",),
    "Lumina2Transformer2DModel": ("context_refiner", "noise_refiner", "layers"),
    "UNet2DConditionModel": ("down_blocks", "mid_block", "up_blocks"),
    "UNet3DConditionModel": ("down_blocks", "mid_block", "up_blocks"),
    "UNetSpatioTemporalConditionModel": ("down_blocks", "mid_block", "up_blocks"),
    "UNetMotionModel": ("down_blocks", "mid_block", "up_blocks"),
}

# transformers class name -> its layouts' block-list attributes (dotted from the model), for the encoders of
# diffusers pipelines; the first layout this model has is used (transformers 5 flattened some wrappers).
KNOWN_ENCODER_BLOCK_ATTRS: dict[str, tuple[tuple[str, ...], ...]] = {
    "T5EncoderModel": (("encoder.block",),),
    "UMT5EncoderModel": (("encoder.block",),),
    "CLIPTextModel": (("text_model.encoder.layers",), ("encoder.layers",)),
    "CLIPTextModelWithProjection": (("text_model.encoder.layers",), ("encoder.layers",)),
    "CLIPVisionModelWithProjection": (("vision_model.encoder.layers",), ("encoder.layers",)),
    "SiglipVisionModel": (("vision_model.encoder.layers",), ("encoder.layers",)),
    "LlamaModel": (("layers",),),
    "LlamaForCausalLM": (("model.layers",),),
    "MistralModel": (("layers",),),
    "GemmaModel": (("layers",),),
    "Gemma2Model": (("layers",),),
    "Qwen2Model": (("layers",),),
    "Qwen3Model": (("layers",),),
    "Qwen2_5_VLForConditionalGeneration": (("model.visual.blocks", "model.language_model.layers"),),
}

_DECLARED = "_layerwise_offload_blocks_attrs"
# A list must hold at least this share of the parameters to count as a block list for the heuristic.
HEURISTIC_MIN_SHARE = 0.1
_LEGACY = "_layerwise_offload_blocks_attr"


def get_blocks_attr_names(model: nn.Module) -> list[str]:
    """Return the names of ``model``'s block lists, in execution order.

    Args:
        model: a DiT or UNet.

    Returns:
        Attribute names (possibly empty when the heuristic finds nothing).

    Raises:
        AttributeError: a declared or registered name is missing from ``model`` or is not a registered
            child container.

    Example:
        >>> from torch import nn
        >>> class DiT(nn.Module):
        ...     _layerwise_offload_blocks_attrs = ["blocks"]
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        >>> get_blocks_attr_names(DiT())
        ['blocks']
    """
    cls = type(model)
    names = getattr(cls, _DECLARED, None)
    source = f"{cls.__name__}.{_DECLARED}"
    legacy = getattr(cls, _LEGACY, None)
    if names is None and legacy is not None:
        legacy = [legacy] if isinstance(legacy, str) else list(legacy)
        warnings.warn(
            f"{cls.__name__}.{_LEGACY} is deprecated; declare {_DECLARED} = {legacy!r}", DeprecationWarning, stacklevel=2
        )
        names, source = legacy, f"{cls.__name__}.{_LEGACY}"
    if names is None and cls.__name__ in KNOWN_BLOCK_ATTRS:
        names, source = KNOWN_BLOCK_ATTRS[cls.__name__], f"offload_map's registry entry for {cls.__name__}"
    if names is None and cls.__name__ in KNOWN_ENCODER_BLOCK_ATTRS:
        layouts = KNOWN_ENCODER_BLOCK_ATTRS[cls.__name__]
        names = next((layout for layout in layouts if all(_resolves(model, name) for name in layout)), layouts[0])
        source = f"offload_map's registry entry for {cls.__name__}"
    if names is None:
        return _infer_block_attrs(model)
    if isinstance(names, str):
        raise TypeError(f"{source} must be a list of attribute names, got the string {names!r}; write [{names!r}]")
    names = list(names)
    for name in names:
        _registered(model, name, source)
    return names


def _resolves(model: nn.Module, name: str) -> bool:
    module = model
    for part in name.split("."):
        module = module._modules.get(part)
        if module is None:
            return False
    return True


def _registered(model: nn.Module, name: str, source: str) -> nn.Module:
    # Follows ``_modules`` only: an attribute that is a property or a plain list is not a block list.
    module = model
    for depth, part in enumerate(name.split(".")):
        child = module._modules.get(part) if isinstance(module, nn.Module) else None
        if child is None:
            kind = (
                "missing"
                if not hasattr(module, part)
                else f"a {type(getattr(module, part)).__name__}, not a registered child module"
            )
            where = ".".join(name.split(".")[:depth]) or type(model).__name__
            raise AttributeError(
                f"{source} names {name!r}, but on this {type(model).__name__} {part!r} (in {where}) is {kind}. Block "
                f"lists must be registered child containers (nn.ModuleList/nn.Sequential assigned as attributes); "
                f"registered children there are {sorted(module._modules)}. Fix the declaration or set {_DECLARED} on the class."
            )
        module = child
    return module


def get_blocks(model: nn.Module, attr_names: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Return ``(path, block)`` for every block of ``model``'s block lists, in declaration order.

    ``path`` is relative to ``model`` (``"transformer_blocks.0"``). A list attribute that is a single module
    (not a container) counts as one block.

    Example:
        >>> from torch import nn
        >>> dit = nn.Module(); dit.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
        >>> [p for p, _ in get_blocks(dit, ["blocks"])]
        ['blocks.0', 'blocks.1']
    """
    names = get_blocks_attr_names(model) if attr_names is None else attr_names
    out: list[tuple[str, nn.Module]] = []
    for name in names:
        container = _registered(model, name, "block list")
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            out.extend((f"{name}.{child}", block) for child, block in container.named_children())
        else:
            out.append((name, container))
    return out


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _infer_block_attrs(model: nn.Module) -> list[str]:
    total = _param_bytes(model)
    if not total:
        return []
    chosen: list[tuple[str, float]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            share = _param_bytes(child) / total
            if share < HEURISTIC_MIN_SHARE:
                continue
            if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) >= 2 and len({type(c) for c in child}) == 1:
                chosen.append((prefix + name, share))
            else:
                visit(f"{prefix}{name}.", child)

    visit("", model)
    held = sum(share for _, share in chosen)
    if held <= 0.5:
        return []
    names = [name for name, _ in chosen]
    logger.info("%s declares no block lists; inferred %s (%.0f%% of its parameters)", type(model).__name__, names, 100 * held)
    return names
