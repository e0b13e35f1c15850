"""offload_map: compile diffusion pipelines into a device map and run them with weights offloaded.

Public API (see README.md):

- ``dispatch_pipeline(pipe, strategy=..., device=..., window=...)`` -> ``OffloadHandle``
- ``compile_device_map(pipe, strategy=..., device=...)`` -> ``DeviceMap``; ``Placement``, ``Role``
- ``empty_model(cls, path)`` and ``dispatch_pipeline(..., weights={name: path})``: load safetensors in place
- vllm-omni's offloader contract: ``OffloadBackend``, ``ModelLevelOffloadBackend``,
  ``LayerWiseOffloadBackend``, ``OffloadConfig``, ``OffloadStrategy``, ``get_offload_backend``,
  ``apply_sequential_offload``, ``remove_sequential_offload``; submodules ``base``,
  ``layerwise_backend``, ``module_collector``, ``sequential_backend``.

The package follows the flow of a dispatch, one folder per stage: ``collect`` (what a pipeline holds) ->
``mapping`` (the device map) -> ``planning`` (the map bound to tensors; the budget planner) -> ``runtime``
(host buffers, slots, streams, hooks); ``loading`` reads checkpoints, ``compat`` is vllm-omni's surface.
``dispatch``, ``handle`` and ``auto`` tie the stages together. Imports only go down that flow.
"""

from .base import OffloadBackend
from .collect.components import ModuleDiscovery, PipelineModules, Role
from .compat.config import OffloadConfig, OffloadStrategy
from .compat.factory import get_offload_backend
from .dispatch import OffloadHandle, dispatch_pipeline
from .layerwise_backend import LayerWiseOffloadBackend
from .loading.checkpoint import CheckpointError
from .loading.weights import empty_model
from .mapping.compiler import STRATEGIES, compile_device_map
from .mapping.device_map import DeviceMap, MapEntry
from .mapping.memory import BudgetTooSmall
from .mapping.placement import Placement
from .sequential_backend import ModelLevelOffloadBackend, apply_sequential_offload, remove_sequential_offload

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
