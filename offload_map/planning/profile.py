"""Device profiles: the measured numbers the planner needs, probed once and kept on disk.

A profile is JSON: the device's name, its pinned host-to-device bandwidth, and optionally per-model
costs (each block's bytes, compute seconds and split points, non-block bytes and compute, activation bytes) recorded
by ``offload-map profile`` on a real GPU, so that ``offload-map plan`` can plan without one. Loading
validates every field (``mapping.schema``); nothing is executed or unpickled. Measuring is the runtime's
(``runtime.bandwidth``); this file only reads and writes the numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..mapping.schema import count, number, parse_json, typed
from .cost_model import BlockCost, ModelCost
from .planner import MIN_BANDWIDTH


@dataclass
class DeviceProfile:
    """Measured numbers for one device, and model costs measured on it (name -> ``ModelCost``); ``device_memory_bytes``
    is the device's memory where it was recorded (profiles from before it was recorded have none)."""

    device_name: str
    h2d_bytes_per_s: float
    models: dict[str, ModelCost] = field(default_factory=dict)
    device_memory_bytes: int | None = None

    def to_dict(self) -> dict:
        out = {
            "device_name": self.device_name,
            "h2d_bytes_per_s": self.h2d_bytes_per_s,
            "models": {name: _cost_to_dict(cost) for name, cost in self.models.items()},
        }
        if self.device_memory_bytes is not None:
            out["device_memory_bytes"] = self.device_memory_bytes
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceProfile":
        """Read a profile dict, checking every field. Raises ValueError naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"a device profile must be a JSON object, got {type(data).__name__}")
        name = typed(data, "device_name", str, "profile")
        bandwidth = number(data, "h2d_bytes_per_s", "profile")
        if bandwidth < MIN_BANDWIDTH:
            raise ValueError(f"profile: 'h2d_bytes_per_s' must be at least {MIN_BANDWIDTH:g} bytes/s, got {bandwidth!r}")
        models = typed(data, "models", dict, "profile")
        memory = count(data, "device_memory_bytes", "profile") if "device_memory_bytes" in data else None
        return cls(name, bandwidth, {str(k): _cost_from_dict(v, f"models[{k!r}]") for k, v in models.items()}, memory)

    def save(self, path: "str | Path") -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: "str | Path") -> "DeviceProfile":
        return cls.from_dict(parse_json(Path(path).read_text(), f"device profile {path}"))


def _cost_to_dict(cost: ModelCost) -> dict:
    return {
        "blocks": [{"path": b.path, "bytes": b.nbytes, "compute_s": b.compute_s, "splits": list(b.splits)} for b in cost.blocks],
        "other_bytes": cost.other_bytes,
        "other_compute_s": cost.other_compute_s,
        "activation_bytes": cost.activation_bytes,
    }


def _cost_from_dict(data: object, where: str) -> ModelCost:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object")
    blocks = []
    for i, raw in enumerate(typed(data, "blocks", list, where)):
        if not isinstance(raw, dict):
            raise ValueError(f"{where}.blocks[{i}] must be an object")
        nbytes = count(raw, "bytes", f"{where}.blocks[{i}]")
        splits = raw.get("splits", [])  # optional: profiles recorded before split blocks have none
        if (
            not isinstance(splits, list)
            or any(type(p) is not int or not 0 < p < nbytes for p in splits)
            or splits != sorted(set(splits))
        ):
            raise ValueError(
                f"{where}.blocks[{i}].splits must be ascending ints between 0 and the block's bytes, got {splits!r:.80}"
            )
        blocks.append(
            BlockCost(
                typed(raw, "path", str, f"{where}.blocks[{i}]"),
                nbytes,
                number(raw, "compute_s", f"{where}.blocks[{i}]"),
                tuple(splits),
            )
        )
    if not blocks:
        raise ValueError(f"{where}.blocks is empty")
    return ModelCost(
        tuple(blocks),
        count(data, "other_bytes", where),
        number(data, "other_compute_s", where),
        count(data, "activation_bytes", where),
    )
