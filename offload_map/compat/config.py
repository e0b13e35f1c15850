"""vllm-omni's offload configuration: ``OffloadStrategy`` and ``OffloadConfig.from_od_config``.

Both surfaces vllm-omni has had are read and mapped onto offload_map's features:

- the flags ``enable_cpu_offload`` (model level), ``enable_layerwise_offload`` and
  ``enable_distributed_layerwise_offload`` (layer-wise; distributed: blocks loaded 1/N per rank and gathered,
  offload_map's ``shard_copies``), with ``dlo_use_allgather`` and ``dlo_resident_layers``, ``pin_cpu_memory``,
  ``parallel_config.use_hsdp``; and sglang's ``layerwise_offload_components``;
- ``diffusion_offload_config``: ``{"mode": "module" | "layer", "components": [...], "layer_options": {component:
  {"weight_transfer": "allgather" | "rank-local", "resident_layers": N}}, "pin_memory": bool}``.

Combinations vllm-omni refuses are refused here too, with a ``ValueError`` naming the field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

logger = logging.getLogger("offload_map")

# Components a diffusion_offload_config may name, and what they are in a pipeline.
COMPONENTS = ("dit", "text_encoder", "vae")


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
        components: which components offload (``"dit"``, ``"text_encoder"``, ``"vae"``), or None for the
            strategy's default (layer-wise: the DiT streams, as in vllm-omni, and the rest stays on the device;
            model level: DiTs and encoders take turns, the VAE stays).
        resident_layers: the DiT's first N blocks stay on the device (layer-wise).
        shard_copies: each rank loads 1/N of every block and the ranks all-gather the rest (layer-wise).
    """

    strategy: OffloadStrategy = OffloadStrategy.NONE
    pin_cpu_memory: bool = True
    use_hsdp: bool = False
    components: frozenset[str] | None = None
    resident_layers: int = 0
    shard_copies: bool = False

    @classmethod
    def from_od_config(cls, od_config: object) -> "OffloadConfig":
        """Extract offload settings from an ``OmniDiffusionConfig`` (or any object with its fields; missing fields
        count as off). Layer-wise wins over model level when both are set.

        Raises:
            ValueError: a field has a value vllm-omni refuses, or fields that do not combine are set together.

        Example:
            >>> from types import SimpleNamespace
            >>> OffloadConfig.from_od_config(SimpleNamespace(enable_cpu_offload=True)).strategy
            <OffloadStrategy.MODEL_LEVEL: 'model'>
            >>> sorted(OffloadConfig.from_od_config(SimpleNamespace(diffusion_offload_config={
            ...     "mode": "layer", "components": ["dit", "text_encoder"]})).components)
            ['dit', 'text_encoder']
        """
        use_hsdp = bool(getattr(getattr(od_config, "parallel_config", None), "use_hsdp", False))
        model = bool(getattr(od_config, "enable_cpu_offload", False))
        layerwise = bool(getattr(od_config, "enable_layerwise_offload", False))
        distributed = bool(getattr(od_config, "enable_distributed_layerwise_offload", False))
        compact = getattr(od_config, "diffusion_offload_config", None)
        if compact is not None:
            if model or layerwise or distributed:
                raise ValueError("diffusion_offload_config cannot be combined with legacy enable_*_offload flags")
            return cls._from_compact(compact, use_hsdp)
        if model and (layerwise or distributed):
            logger.info(
                "Both model-level and layer-wise offloading enabled. Layer-wise takes priority, disabling model-level offloading."
            )
        pin = bool(getattr(od_config, "pin_cpu_memory", True))
        resident = getattr(od_config, "dlo_resident_layers", 0) or 0
        allgather = bool(getattr(od_config, "dlo_use_allgather", True)) and distributed
        if type(resident) is not int or resident < 0:
            raise ValueError(f"dlo_resident_layers must be >= 0, got {resident!r}")
        if resident and allgather:
            raise ValueError(
                "dlo_resident_layers currently requires --dlo-no-use-allgather so resident blocks use "
                "weights prepared by the standard TP-aware loader"
            )
        if allgather and use_hsdp:
            raise ValueError(
                "Distributed layerwise offload with AllGather is incompatible with HSDP: the weights are "
                "already sharded; set dlo_use_allgather=False"
            )
        sglang = getattr(od_config, "layerwise_offload_components", None)
        components = _components(sglang, "layerwise_offload_components") if sglang else None
        strategy = (
            OffloadStrategy.LAYER_WISE
            if layerwise or distributed or sglang
            else OffloadStrategy.MODEL_LEVEL
            if model
            else OffloadStrategy.NONE
        )
        return cls(strategy, pin, use_hsdp, components, resident, allgather)

    @classmethod
    def _from_compact(cls, data: object, use_hsdp: bool) -> "OffloadConfig":
        if not isinstance(data, dict):
            raise ValueError(f"diffusion_offload_config must be a dict, got {type(data).__name__}")
        if "mode" not in data:
            raise ValueError("diffusion_offload_config requires 'mode'")
        mode = data["mode"]
        if mode not in ("module", "layer"):
            raise ValueError(f"diffusion_offload_config 'mode' must be 'module' or 'layer', got {mode!r}")
        components = _components(data.get("components", ["dit"]), "diffusion_offload_config 'components'")
        if "vae" in components and mode != "module":
            raise ValueError("diffusion_offload_config 'vae' component requires mode='module'")
        options = data.get("layer_options") or {}
        if not isinstance(options, dict) or not set(options) <= set(COMPONENTS):
            raise ValueError(
                f"diffusion_offload_config 'layer_options' must map components of {list(COMPONENTS)} "
                f"to options, got {options!r:.80}"
            )
        dit = options.get("dit") or {}
        transfer = dit.get("weight_transfer", "rank-local")
        if transfer not in ("allgather", "rank-local"):
            raise ValueError(
                f"diffusion_offload_config dit.weight_transfer must be 'allgather' or 'rank-local', got {transfer!r}"
            )
        resident = dit.get("resident_layers", 0)
        if type(resident) is not int or resident < 0:
            raise ValueError(f"diffusion_offload_config dit.resident_layers must be an int >= 0, got {resident!r}")
        if resident and transfer != "rank-local":
            raise ValueError("resident_layers requires dit.weight_transfer='rank-local'")
        pin = data.get("pin_memory", True)
        if not isinstance(pin, bool):
            raise ValueError(f"diffusion_offload_config 'pin_memory' must be a bool, got {pin!r}")
        strategy = OffloadStrategy.LAYER_WISE if mode == "layer" else OffloadStrategy.MODEL_LEVEL
        return cls(strategy, pin, use_hsdp, components, resident, transfer == "allgather")


def _components(value: object, field: str) -> frozenset[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple, set, frozenset)) or not names or not set(names) <= set(COMPONENTS):
        raise ValueError(f"{field} must name components of {list(COMPONENTS)}, got {value!r:.80}")
    return frozenset(names)
