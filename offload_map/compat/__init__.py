"""vllm-omni's offloader contract (``vllm_omni.diffusion.offloader``) on offload_map's runtime.

- ``config``: ``OffloadStrategy``, ``OffloadConfig.from_od_config``;
- ``backend``: ``OffloadBackend``, ``LayerWiseOffloadBackend``, ``ModelLevelOffloadBackend``;
- ``sequential``: ``apply_sequential_offload``, ``remove_sequential_offload``;
- ``factory``: ``get_offload_backend``.

Users import these names from ``offload_map`` or from the seed submodules ``offload_map.base``,
``.layerwise_backend``, ``.module_collector`` and ``.sequential_backend``, which re-export them.
"""
