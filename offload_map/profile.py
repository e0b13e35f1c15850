"""Device profiles: the measured numbers the planner needs, probed once and kept on disk.

A profile is JSON: the device's name, its pinned host-to-device bandwidth, and optionally per-model
costs (each block's bytes, compute seconds and split points, non-block bytes and compute, activation bytes) recorded
by ``offload-map profile`` on a real GPU, so that ``offload-map plan`` can plan without one. Loading
validates every field; nothing is executed or unpickled.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .budget import MAX_SIZE
from .cost_model import BlockCost, ModelCost
from .device_map import parse_json

PROBE_BYTES = 256 << 20
# Bandwidths below this are corrupt data, not a link (and would overflow the planner's timeline).
MIN_BANDWIDTH = 1e3


@dataclass
class DeviceProfile:
    """Measured numbers for one device, and model costs measured on it (name -> ``ModelCost``)."""

    device_name: str
    h2d_bytes_per_s: float
    models: dict[str, ModelCost] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "device_name": self.device_name,
            "h2d_bytes_per_s": self.h2d_bytes_per_s,
            "models": {name: _cost_to_dict(cost) for name, cost in self.models.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceProfile":
        """Read a profile dict, checking every field. Raises ValueError naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"a device profile must be a JSON object, got {type(data).__name__}")
        name = _field(data, "device_name", str)
        bandwidth = _number(data, "h2d_bytes_per_s")
        if bandwidth < MIN_BANDWIDTH:
            raise ValueError(f"profile.h2d_bytes_per_s must be at least {MIN_BANDWIDTH:g} bytes/s, got {bandwidth!r}")
        models = _field(data, "models", dict)
        return cls(name, bandwidth, {str(k): _cost_from_dict(v, f"models[{k!r}]") for k, v in models.items()})

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
    for i, raw in enumerate(_field(data, "blocks", list, where)):
        if not isinstance(raw, dict):
            raise ValueError(f"{where}.blocks[{i}] must be an object")
        nbytes = _count(raw, "bytes", where)
        splits = raw.get("splits", [])  # optional: profiles recorded before split blocks have none
        if not isinstance(splits, list) or any(type(p) is not int or not 0 < p < nbytes for p in splits) or splits != sorted(set(splits)):
            raise ValueError(f"{where}.blocks[{i}].splits must be ascending ints between 0 and the block's bytes, got {splits!r:.80}")
        blocks.append(BlockCost(_field(raw, "path", str, where), nbytes, _number(raw, "compute_s", where=where), tuple(splits)))
    if not blocks:
        raise ValueError(f"{where}.blocks is empty")
    return ModelCost(
        tuple(blocks),
        _count(data, "other_bytes", where),
        _number(data, "other_compute_s", where=where),
        _count(data, "activation_bytes", where),
    )


def _field(data: dict, key: str, kind: type, where: str = "profile"):
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}.{key} must be a {kind.__name__}, got {value!r}")
    return value


def _number(data: dict, key: str, where: str = "profile") -> float:
    value = data.get(key)
    try:
        number = float(value) if not isinstance(value, bool) and isinstance(value, (int, float)) else math.nan
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{where}.{key} must be a finite non-negative number, got {value!r:.40}")
    return number


def _count(data: dict, key: str, where: str) -> int:
    value = data.get(key)
    if type(value) is not int or not 0 <= value <= MAX_SIZE:
        raise ValueError(f"{where}.{key} must be an int between 0 and {MAX_SIZE}, got {value!r:.40}")
    return value


def device_name(device: torch.device) -> str:
    """A stable name for the device's kind, e.g. ``"NVIDIA H100 80GB HBM3"`` or ``"cpu"``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def cache_path() -> Path:
    """Where probed bandwidths are kept (``$OFFLOAD_MAP_CACHE`` or ``~/.cache/offload_map``)."""
    root = os.environ.get("OFFLOAD_MAP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "offload_map")
    return Path(root) / "bandwidth.json"


def probe_bandwidth(device: torch.device, nbytes: int = PROBE_BYTES, repeats: int = 5) -> float:
    """Pinned host-to-``device`` copy bandwidth in bytes/s (median of ``repeats``), without the cache."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        target.copy_(host, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:])


def bandwidth(device: torch.device) -> float:
    """The pinned host-to-device bandwidth of ``device``: probed once per device kind, then read from the cache."""
    path = cache_path()
    name = device_name(device)
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cached = {}
    value = cached.get(name) if isinstance(cached, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    measured = probe_bandwidth(device)
    cached = cached if isinstance(cached, dict) else {}
    cached[name] = measured
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    except OSError:
        pass
    return measured
