"""Sizes: reading a memory budget (accelerate's ``max_memory`` convention) and printing byte counts."""

from __future__ import annotations

import torch
from accelerate.utils import convert_file_size_to_int

from .schema import MAX_SIZE


def parse_size(value: "int | float | str", what: str = "size") -> int:
    """Bytes in ``value``: a number of bytes, or a string in accelerate's ``max_memory`` format
    (``accelerate.utils.convert_file_size_to_int``): ``"12GiB"``, ``"512MiB"``, ``"12GB"`` (10**9 bytes; a
    lower-case ``b``, as in ``"12Gb"``, means bits there).

    Raises:
        ValueError: ``value`` is not such a size, or is outside 1 byte .. ``MAX_SIZE``; the message shows the forms.

    Example:
        >>> parse_size("1.5GiB")
        1610612736
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what} must be a size like '12GiB' or a number of bytes, got {value!r:.40}")
    nbytes = value
    if isinstance(value, str):
        try:
            nbytes = convert_file_size_to_int(value)
        except (ValueError, OverflowError):  # OverflowError: "infGiB"
            nbytes = -1
        if nbytes < 0:
            raise ValueError(f"{what} {value!r:.40} is not a size; write e.g. '12GiB', '12GB' or '512MiB'")
    if not 1 <= nbytes <= MAX_SIZE:  # NaN fails both comparisons
        raise ValueError(f"{what} must be between 1 byte and {MAX_SIZE:.0e} bytes, got {value!r:.40}")
    return int(nbytes)


def budget_key(device: torch.device) -> "int | str":
    """The key ``max_memory`` takes for ``device``: its index on CUDA, ``"cpu"`` otherwise."""
    return (device.index or 0) if device.type == "cuda" else "cpu"


def device_budget(device: torch.device, max_memory: dict | None, gpu_budget) -> int | None:
    """The budget for ``device`` from ``max_memory`` ({index or "cuda:i": size}) or ``gpu_budget``; None if neither.

    Raises:
        ValueError: both are given, ``max_memory`` has no entry for the device, or a size is malformed.

    Example:
        >>> device_budget(torch.device("cpu"), {"cpu": "1GiB"}, None)
        1073741824
    """
    if max_memory is not None and gpu_budget is not None:
        raise ValueError("pass either max_memory or gpu_budget, not both")
    if gpu_budget is not None:
        return parse_size(gpu_budget, "gpu_budget")
    if max_memory is None:
        return None
    if not isinstance(max_memory, dict):
        raise ValueError(f"max_memory must be a dict like {{0: '12GiB'}}, got {max_memory!r}")
    keys = [budget_key(device), str(device)] if device.type == "cuda" else ["cpu"]
    for key in keys:
        if key in max_memory:
            return parse_size(max_memory[key], f"max_memory[{key!r}]")
    raise ValueError(f"max_memory {max_memory!r} has no entry for the target device {device} (expected key {keys[0]!r})")


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``.

    Example:
        >>> human_bytes(1536), human_bytes(3 * 2**30)
        ('1.5 KiB', '3.0 GiB')
    """
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_rate(bytes_per_s: float) -> str:
    """``5.4e10`` -> ``"54.0 GB/s"``; slow links in the unit that shows them.

    Example:
        >>> human_rate(5.4e10), human_rate(4.7e6)
        ('54.0 GB/s', '4.7 MB/s')
    """
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.1f} {unit}"
    return f"{bytes_per_s:.0f} B/s"
