"""vllm-omni's ``offloader.base``: the backend contract (implemented in ``offload_map.compat``)."""

from .compat.backend import OffloadBackend
from .compat.config import OffloadConfig, OffloadStrategy

__all__ = ["OffloadBackend", "OffloadConfig", "OffloadStrategy"]
