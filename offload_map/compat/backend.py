"""vllm-omni's backends: the ``OffloadBackend`` contract, and its layer-wise and model-level implementations on
``dispatch_pipeline``."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ..collect.blocks import get_blocks_attr_names
from ..dispatch import OffloadHandle, dispatch_pipeline
from .config import OffloadConfig


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


class DispatchBackend(OffloadBackend):
    """An ``OffloadBackend`` that runs ``dispatch_pipeline`` with the subclass's ``strategy``."""

    strategy = "none"

    def __init__(self, config: OffloadConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.handle: OffloadHandle | None = None

    def enable(self, pipeline: nn.Module) -> None:
        """Dispatch ``pipeline`` with this backend's strategy (see ``dispatch_pipeline``)."""
        if self.enabled:
            raise RuntimeError(f"{type(self).__name__} is already enabled on a pipeline; call disable() first")
        self.handle = dispatch_pipeline(
            pipeline, self.strategy, self.device, pin_memory=self.config.pin_cpu_memory, blocking=self.config.use_hsdp
        )
        self.enabled = True

    def disable(self) -> None:
        """Remove the hooks; modules stay where they are. Does nothing if not enabled."""
        if self.handle is not None:
            self.handle.detach()
            self.handle = None
        self.enabled = False


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
