"""Reading a device memory budget: accelerate's ``max_memory`` convention or a plain size."""

from __future__ import annotations

import re

import torch

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MAX_SIZE = 2**60  # an exabyte: anything larger is a typo
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(value: "int | float | str", what: str = "size") -> int:
    """Bytes in ``value``: an int, or a string like ``"12GiB"``, ``"12GB"`` (10**9), ``"512MiB"``.

    Example:
        >>> parse_size("1.5GiB")
        1610612736
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what} must be a size like '12GiB' or a number of bytes, got {value!r:.40}")
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).upper() if match else None
        if unit not in _UNITS:
            raise ValueError(f"{what} {value!r:.40} is not a size; write e.g. '12GiB', '12GB' or '512MiB'")
        value = float(match.group(1)) * _UNITS[unit]
    if not (1 <= value <= MAX_SIZE):  # NaN fails both comparisons; ints compare exactly, however large
        raise ValueError(f"{what} must be between 1 byte and {MAX_SIZE:.0e} bytes, got {value!r:.40}")
    return int(value)


def device_budget(device: torch.device, max_memory: dict | None, gpu_budget) -> int | None:
    """The budget for ``device`` from ``max_memory`` ({index or "cuda:i": size}) or ``gpu_budget``; None if neither.

    Raises:
        ValueError: both are given, ``max_memory`` has no entry for the device, or a size is malformed.
    """
    if max_memory is not None and gpu_budget is not None:
        raise ValueError("pass either max_memory or gpu_budget, not both")
    if gpu_budget is not None:
        return parse_size(gpu_budget, "gpu_budget")
    if max_memory is None:
        return None
    if not isinstance(max_memory, dict):
        raise ValueError(f"max_memory must be a dict like {{0: '12GiB'}}, got {max_memory!r}")
    keys = [device.index, str(device)] if device.type == "cuda" else ["cpu"]
    for key in keys:
        if key in max_memory:
            return parse_size(max_memory[key], f"max_memory[{key!r}]")
    raise ValueError(f"max_memory {max_memory!r} has no entry for the target device {device} (expected key {keys[0]!r})")
