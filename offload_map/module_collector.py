"""vllm-omni's ``offloader.module_collector`` (implemented in ``offload_map.collect.components``)."""

from .collect.components import Component, ModuleDiscovery, PipelineModules

__all__ = ["Component", "ModuleDiscovery", "PipelineModules"]
