"""Finding a DiT's block lists: declared, registered, or inferred.

Resolution order for ``get_blocks_attr_names(model)``:

1. The class attribute ``_layerwise_offload_blocks_attrs`` (vllm-omni's protocol), a list of attribute
   names; the legacy single-string ``_layerwise_offload_blocks_attr`` is read with a deprecation warning.
2. ``KNOWN_BLOCK_ATTRS``, keyed by class name, for diffusers' transformers and UNets.
3. The heuristic: the model's direct children that are ``nn.ModuleList``/``nn.Sequential`` of at least
   two children all of one type, each holding at least ``HEURISTIC_MIN_SHARE`` of the parameter bytes,
   in declaration order, provided that together they hold more than half of them (else none).

Every declared or registered name must be a registered child container of the model (seen in
``named_children()``): a Python ``@property`` or a plain list is an error, never a silent fall-back to
moving the whole model to the device.
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
        warnings.warn(f"{cls.__name__}.{_LEGACY} is deprecated; declare {_DECLARED} = {legacy!r}", DeprecationWarning, stacklevel=2)
        names, source = legacy, f"{cls.__name__}.{_LEGACY}"
    if names is None and cls.__name__ in KNOWN_BLOCK_ATTRS:
        names, source = KNOWN_BLOCK_ATTRS[cls.__name__], f"offload_map's registry entry for {cls.__name__}"
    if names is None:
        return _infer_block_attrs(model)
    if isinstance(names, str):
        raise TypeError(f"{source} must be a list of attribute names, got the string {names!r}; write [{names!r}]")
    names = list(names)
    children = dict(model.named_children())
    for name in names:
        if name not in children:
            kind = "missing" if not hasattr(model, name) else f"a {type(getattr(model, name)).__name__}, not a registered child module"
            raise AttributeError(
                f"{source} names {name!r}, but on this {cls.__name__} it is {kind}. Block lists must be registered "
                f"child containers (nn.ModuleList/nn.Sequential assigned as attributes); registered children are "
                f"{sorted(children)}. Fix the declaration or set {_DECLARED} on the class."
            )
    return names


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
    children = dict(model.named_children())
    out: list[tuple[str, nn.Module]] = []
    for name in names:
        container = children[name]
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
    chosen = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) >= 2 and len({type(c) for c in child}) == 1:
            share = _param_bytes(child) / total
            if share >= HEURISTIC_MIN_SHARE:
                chosen.append((name, share))
    held = sum(share for _, share in chosen)
    if held <= 0.5:
        return []
    names = [name for name, _ in chosen]
    logger.info("%s declares no block lists; inferred %s (%.0f%% of its parameters)", type(model).__name__, names, 100 * held)
    return names
