"""``get_offload_backend``: the backend an ``OmniDiffusionConfig`` asks for."""

from __future__ import annotations

import logging

import torch

from ..mapping.devices import resolve_device
from .backend import LayerWiseOffloadBackend, ModelLevelOffloadBackend, OffloadBackend
from .config import OffloadConfig, OffloadStrategy

logger = logging.getLogger("offload_map")


def get_offload_backend(od_config: object, device: "torch.device | None" = None) -> OffloadBackend | None:
    """Create the offload backend ``od_config`` asks for.

    Args:
        od_config: an ``OmniDiffusionConfig`` or any object with its offload fields.
        device: target device; ``None`` means this rank's GPU.

    Returns:
        A backend, or None when offloading is off, or when no device is given and there is no GPU (warned).

    Example:
        >>> from types import SimpleNamespace
        >>> import torch
        >>> get_offload_backend(SimpleNamespace(enable_layerwise_offload=True), torch.device("cpu")).strategy
        'layerwise'
    """
    config = OffloadConfig.from_od_config(od_config)
    if config.strategy is OffloadStrategy.NONE:
        return None
    if device is None and not torch.cuda.is_available():
        logger.warning("offloading was asked for, but there is no CUDA device to offload to; offloading is off")
        return None
    backend = LayerWiseOffloadBackend if config.strategy is OffloadStrategy.LAYER_WISE else ModelLevelOffloadBackend
    return backend(config, resolve_device(device))
