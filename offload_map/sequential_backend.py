"""vllm-omni's ``offloader.sequential_backend`` (implemented in ``offload_map.compat``)."""

from .compat.backend import ModelLevelOffloadBackend
from .compat.sequential import apply_sequential_offload, remove_sequential_offload, sequential_offload_component

__all__ = ["ModelLevelOffloadBackend", "apply_sequential_offload", "remove_sequential_offload", "sequential_offload_component"]
