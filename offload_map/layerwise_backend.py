"""vllm-omni's ``LayerWiseOffloadBackend``, on offload_map's layer-window runtime."""

from __future__ import annotations

from .base import DispatchBackend
from .blocks import get_blocks_attr_names


class LayerWiseOffloadBackend(DispatchBackend):
    """Layer-wise (block-level) offloading backend.

    Only a window of each DiT's blocks sits on the device; the next blocks are copied in on a dedicated
    stream while the current block computes, and their slots are reused once they ran. Encoders and
    VAEs take turns with the DiT as in model-level offload.

    Example:
        >>> import torch
        >>> from offload_map import OffloadConfig, OffloadStrategy
        >>> from offload_map.demo import make_tiny_pipeline
        >>> backend = LayerWiseOffloadBackend(OffloadConfig(OffloadStrategy.LAYER_WISE), torch.device("cpu"))
        >>> backend.enable(make_tiny_pipeline())
        >>> backend.disable()
    """

    strategy = "layerwise"
    get_blocks_attr_names = staticmethod(get_blocks_attr_names)
