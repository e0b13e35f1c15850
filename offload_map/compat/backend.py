"""vllm-omni's backends: the ``OffloadBackend`` contract, and its layer-wise and model-level implementations on
``dispatch_pipeline``, placing components as vllm-omni does:

- layer-wise: the DiT's blocks stream (its first ``resident_layers`` stay); the encoders and VAEs stay on the
  device, unless ``components`` names ``"text_encoder"`` (then they stream too, or take turns whole if they
  have no block lists);
- model level: DiTs and encoders take turns on the device, encoders loaded up front; VAEs and the pipeline's
  ``_resident_modules`` stay on the device (``components`` narrows or widens what takes turns; components in
  ``pipeline._bnb_offload_skip_components`` never move). A pipeline that implements
  ``enable_omni_model_cpu_offload``/``disable_omni_model_cpu_offload`` runs its own.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import torch
from torch import nn

from ..collect.components import ModuleDiscovery, PipelineModules, Role
from ..dispatch import OffloadHandle, dispatch_pipeline
from ..mapping.compiler import compile_device_map
from ..mapping.device_map import DeviceMap
from ..mapping.placement import Placement
from . import blocks
from .config import OffloadConfig

logger = logging.getLogger("offload_map")


class OffloadBackend(ABC):
    """Base class for CPU offload backends.

    Args:
        config: the validated settings.
        device: the target device.
    """

    def __init__(self, config: OffloadConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.enabled = False

    @abstractmethod
    def enable(self, pipeline: nn.Module) -> None:
        """Enable offloading on the pipeline: discover modules, move them to their places, register hooks."""

    @abstractmethod
    def disable(self) -> None:
        """Disable offloading: remove all hooks. Does NOT move modules back to their original devices."""

    def is_enabled(self) -> bool:
        """Whether offloading is enabled."""
        return self.enabled


class DispatchBackend(OffloadBackend):
    """An ``OffloadBackend`` that dispatches the pipeline under the device map its subclass places."""

    def __init__(self, config: OffloadConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.handle: OffloadHandle | None = None

    def enable(self, pipeline: nn.Module) -> None:
        """Place and hook ``pipeline`` (see the module docstring); a second call warns and does nothing."""
        if self.enabled:
            logger.warning("%s already enabled", type(self).__name__)
            return
        found = ModuleDiscovery.discover(pipeline)
        dmap = self.place(pipeline, found)
        if dmap is None:
            return
        self.handle = dispatch_pipeline(
            pipeline,
            device_map=dmap,
            pin_memory=self.config.pin_cpu_memory,
            blocking=self.config.use_hsdp,
            shard_copies=self.config.shard_copies,
        )
        self.enabled = True
        self.started(found)

    def place(self, pipeline: object, found: PipelineModules) -> DeviceMap | None:
        """The device map to dispatch under, or None to leave the pipeline as it is."""
        raise NotImplementedError

    def started(self, found: PipelineModules) -> None:
        """After dispatch: bring onto the device what vllm-omni has there from the start."""

    def disable(self) -> None:
        """Remove the hooks; modules stay where they are. Does nothing if not enabled."""
        if self.handle is not None:
            self.handle.detach()
            self.handle = None
        self.enabled = False


def _keep(dmap: DeviceMap, name: str) -> None:
    # A component and everything inside it resident.
    for path in [p for p in dmap.entries if p != name and p.startswith(f"{name}.")]:
        del dmap.entries[path]
    dmap[name] = Placement.GPU


class LayerWiseOffloadBackend(DispatchBackend):
    """Layer-wise (block-level) offloading backend.

    Only a window of the DiT's blocks sits on the device; the next blocks are copied in on a dedicated stream while
    the current block computes, and their slots are reused once they ran. Encoders and VAEs stay on the device
    unless the config streams them (see the module docstring).

    Example:
        >>> import torch
        >>> from offload_map import OffloadConfig, OffloadStrategy
        >>> from offload_map.demo import make_tiny_pipeline
        >>> backend = LayerWiseOffloadBackend(OffloadConfig(OffloadStrategy.LAYER_WISE), torch.device("cpu"))
        >>> backend.enable(make_tiny_pipeline())
        >>> backend.is_enabled()
        True
        >>> backend.disable()
    """

    strategy = "layerwise"
    get_blocks_attr_names = staticmethod(blocks.get_blocks_attr_names)
    set_blocks_attr_names = staticmethod(blocks.set_blocks_attr_names)
    get_blocks_from_dit = staticmethod(blocks.get_blocks_from_dit)

    def place(self, pipeline: object, found: PipelineModules) -> DeviceMap:
        dmap = compile_device_map(pipeline, "none", self.device)  # what does not stream stays on the device
        streamed = self.config.components or frozenset({"dit"})
        kinds = {Role.DIT: "dit", Role.ENCODER: "text_encoder"}
        for comp in found.components.values():
            if kinds.get(comp.role) not in streamed or comp.resident:
                continue
            paths = [path for path, _ in comp.blocks()]
            if not paths and comp.role is Role.DIT:
                logger.warning("No blocks found in %s, skipping layerwise offloading", type(comp.module).__name__)
            elif not paths:  # an encoder without block lists takes turns whole
                dmap[comp.name] = Placement.CPU_PINNED
            for index, path in enumerate(paths):
                resident = comp.role is Role.DIT and index < self.config.resident_layers
                dmap[path] = Placement.GPU if resident else Placement.LAYER_WINDOW
        return dmap


class ModelLevelOffloadBackend(DispatchBackend):
    """Model-level (sequential) offloading backend: DiTs and encoders take turns on the device.

    Example:
        >>> import torch
        >>> from offload_map import OffloadConfig, OffloadStrategy
        >>> from offload_map.demo import make_tiny_pipeline
        >>> backend = ModelLevelOffloadBackend(OffloadConfig(OffloadStrategy.MODEL_LEVEL), torch.device("cpu"))
        >>> backend.enable(make_tiny_pipeline())
        >>> backend.disable()
    """

    strategy = "model"

    def __init__(self, config: OffloadConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.delegate: object | None = None

    def enable(self, pipeline: nn.Module) -> None:
        """Let the pipeline run its own model offload if it implements vllm-omni's protocol
        (``enable_omni_model_cpu_offload(device=, pin_memory=, use_hsdp=)``), else place and hook it."""
        own = getattr(pipeline, "enable_omni_model_cpu_offload", None)
        if callable(own) and not self.enabled:
            own(device=self.device, pin_memory=self.config.pin_cpu_memory, use_hsdp=self.config.use_hsdp)
            self.delegate, self.enabled = pipeline, True
            return
        super().enable(pipeline)

    def place(self, pipeline: object, found: PipelineModules) -> DeviceMap | None:
        if not found.dits:
            logger.warning("No DiT/transformer modules found, skipping model-level offloading")
            return None
        if not found.encoders:
            for dit in found.dits:
                dit.to(self.device)
            logger.warning("No encoder modules found, skipping model-level offloading")
            return None
        dmap = compile_device_map(pipeline, "model", self.device)
        moving = self.config.components or frozenset({"dit", "text_encoder"})
        skipped = set(getattr(pipeline, "_bnb_offload_skip_components", ()) or ())
        kinds = {Role.DIT: "dit", Role.ENCODER: "text_encoder", Role.VAE: "vae"}
        for comp in found.components.values():
            if kinds.get(comp.role) not in moving or comp.name in skipped:
                _keep(dmap, comp.name)
        return dmap

    def started(self, found: PipelineModules) -> None:
        for name in found.encoder_names:  # encoders run first, and together: loaded up front
            self.handle.runtime.activate(name)

    def disable(self) -> None:
        """Remove the hooks (or the pipeline's own offload); modules stay where they are."""
        if self.delegate is not None:
            self.delegate.disable_omni_model_cpu_offload()
            self.delegate, self.enabled = None, False
            return
        super().disable()
