"""offload_map: compile diffusion pipelines into a device map and run them with weights offloaded.

Public API (see README.md):

- ``dispatch_pipeline(pipe, strategy=..., device=..., window=...)`` -> ``OffloadHandle``
- ``compile_device_map(pipe, strategy=..., device=...)`` -> ``DeviceMap``; ``Placement``, ``Role``
- ``empty_model(cls, path)`` and ``dispatch_pipeline(..., weights={name: path})``: load safetensors in place
- vllm-omni's offloader contract: ``OffloadBackend``, ``ModelLevelOffloadBackend``,
  ``LayerWiseOffloadBackend``, ``OffloadConfig``, ``OffloadStrategy``, ``get_offload_backend``,
  ``apply_sequential_offload``, ``remove_sequential_offload``; submodules ``base``,
  ``layerwise_backend``, ``module_collector``, ``sequential_backend``.
"""

from .base import OffloadBackend
from .checkpoint import CheckpointError
from .compiler import STRATEGIES, compile_device_map
from .config import OffloadConfig, OffloadStrategy
from .device_map import DeviceMap, MapEntry
from .dispatch import OffloadHandle, dispatch_pipeline
from .factory import get_offload_backend
from .layerwise_backend import LayerWiseOffloadBackend
from .module_collector import ModuleDiscovery, PipelineModules
from .placement import Placement, Role
from .planner import BudgetTooSmall
from .sequential_backend import ModelLevelOffloadBackend, apply_sequential_offload, remove_sequential_offload
from .weights import empty_model

__all__ = [
    "STRATEGIES",
    "BudgetTooSmall",
    "CheckpointError",
    "DeviceMap",
    "LayerWiseOffloadBackend",
    "MapEntry",
    "ModelLevelOffloadBackend",
    "ModuleDiscovery",
    "OffloadBackend",
    "OffloadConfig",
    "OffloadHandle",
    "OffloadStrategy",
    "PipelineModules",
    "Placement",
    "Role",
    "apply_sequential_offload",
    "compile_device_map",
    "dispatch_pipeline",
    "empty_model",
    "get_offload_backend",
    "remove_sequential_offload",
]
__version__ = "0.1.0"
