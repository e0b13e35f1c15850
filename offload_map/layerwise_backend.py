"""vllm-omni's ``offloader.layerwise_backend`` (implemented in ``offload_map.compat``)."""

from .compat.backend import LayerWiseOffloadBackend

__all__ = ["LayerWiseOffloadBackend"]
