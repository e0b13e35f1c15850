"""vllm-omni's block discovery, as its ``LayerWiseOffloadBackend`` static methods behave: declared block lists only.

offload_map's own discovery (``collect.blocks``) also knows a registry of classes and a heuristic; vllm-omni's
contract is narrower, and code written against it may rely on that (a class that declares nothing gets no
layer-wise offload there), so the compat surface keeps it.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger("offload_map")

_DECLARED = "_layerwise_offload_blocks_attrs"
_LEGACY = "_layerwise_offload_blocks_attr"


def get_blocks_attr_names(model: nn.Module) -> list[str]:
    """The class's declared ``_layerwise_offload_blocks_attrs`` (the legacy single ``_layerwise_offload_blocks_attr``
    with a warning), or ``[]``.

    Example:
        >>> from torch import nn
        >>> get_blocks_attr_names(nn.Linear(2, 2))
        []
    """
    names = list(getattr(type(model), _DECLARED, None) or [])
    legacy = getattr(type(model), _LEGACY, None)
    if not names and legacy:
        logger.warning("'%s' is deprecated, please use '%s' instead. Example: %s = ['blocks']", _LEGACY, _DECLARED, _DECLARED)
        names = [legacy] if isinstance(legacy, str) else list(legacy)
    return names


def set_blocks_attr_names(model: nn.Module, names: list[str]) -> None:
    """Declare ``names`` as the block lists of ``model``'s class, unless the class declares its own."""
    if _DECLARED not in vars(type(model)):
        setattr(type(model), _DECLARED, list(names))


def get_blocks_from_dit(model: nn.Module) -> tuple[list[str], list[nn.Module]]:
    """``(attribute names, blocks)`` of the declared block lists, in declaration order; ``([], [])`` with a warning
    when nothing is declared or found (layer-wise offload is then skipped for that model).

    Raises:
        AttributeError: a declared attribute is missing or ``None``.

    Example:
        >>> from torch import nn
        >>> class DiT(nn.Module):
        ...     _layerwise_offload_blocks_attrs = ["blocks"]
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
        >>> names, blocks = get_blocks_from_dit(DiT())
        >>> names, len(blocks)
        (['blocks'], 3)
    """
    names = get_blocks_attr_names(model)
    if not names:
        logger.warning("No %s defined for %s, skipping layerwise offloading", _DECLARED, type(model).__name__)
        return [], []
    blocks: list[nn.Module] = []
    for name in names:
        value = getattr(model, name, None)
        if value is None:
            raise AttributeError(f"Attribute '{name}' declared in {_DECLARED} does not exist on model {type(model).__name__}")
        if isinstance(value, (nn.ModuleList, nn.Sequential, list, tuple)):
            blocks.extend(value)
        elif isinstance(value, nn.Module):
            logger.warning("Attribute '%s' on %s is not iterable; treating it as one block.", name, type(model).__name__)
            blocks.append(value)
        else:
            logger.warning(
                "Attribute '%s' on %s is not iterable (got %s); skipping it.", name, type(model).__name__, type(value).__name__
            )
    if not blocks:
        logger.warning("No blocks found in %s for %s, skipping layerwise offloading", names, type(model).__name__)
        return [], []
    return names, blocks
