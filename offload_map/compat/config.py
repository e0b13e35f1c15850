"""vllm-omni's offload configuration: ``OffloadStrategy`` and ``OffloadConfig.from_od_config``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

logger = logging.getLogger("offload_map")


class OffloadStrategy(str, Enum):
    """Which offloading a backend does; values are ``dispatch_pipeline`` strategy names."""

    NONE = "none"
    MODEL_LEVEL = "model"
    LAYER_WISE = "layerwise"


@dataclass(frozen=True)
class OffloadConfig:
    """Validated offload settings.

    Attributes:
        strategy: what to do.
        pin_cpu_memory: keep host copies page-locked (fast asynchronous copies).
        use_hsdp: HSDP is on, so component copies are synchronous.
    """

    strategy: OffloadStrategy = OffloadStrategy.NONE
    pin_cpu_memory: bool = True
    use_hsdp: bool = False

    @classmethod
    def from_od_config(cls, od_config: object) -> "OffloadConfig":
        """Extract offload settings from an ``OmniDiffusionConfig`` (or any object with its fields).

        Reads ``enable_cpu_offload``, ``enable_layerwise_offload``, ``pin_cpu_memory`` (default True) and
        ``parallel_config.use_hsdp``; missing fields count as off. Layer-wise wins when both are enabled.

        Example:
            >>> from types import SimpleNamespace
            >>> OffloadConfig.from_od_config(SimpleNamespace(enable_cpu_offload=True)).strategy
            <OffloadStrategy.MODEL_LEVEL: 'model'>
        """
        model = bool(getattr(od_config, "enable_cpu_offload", False))
        layerwise = bool(getattr(od_config, "enable_layerwise_offload", False))
        if model and layerwise:
            logger.info("both enable_cpu_offload and enable_layerwise_offload are set; using layer-wise offload")
        strategy = OffloadStrategy.LAYER_WISE if layerwise else OffloadStrategy.MODEL_LEVEL if model else OffloadStrategy.NONE
        parallel = getattr(od_config, "parallel_config", None)
        return cls(
            strategy=strategy,
            pin_cpu_memory=bool(getattr(od_config, "pin_cpu_memory", True)),
            use_hsdp=bool(getattr(parallel, "use_hsdp", False)),
        )
