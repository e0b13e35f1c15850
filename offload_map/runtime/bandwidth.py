"""Measuring the pinned host-to-device bandwidth of a device, probed once per device kind and cached on disk."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

PROBE_BYTES = 256 << 20


def device_name(device: torch.device) -> str:
    """A stable name for the device's kind, e.g. ``"NVIDIA H100 80GB HBM3"`` or ``"cpu"``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_memory(device: torch.device) -> int | None:
    """The device's memory in bytes (None for the CPU)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


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
