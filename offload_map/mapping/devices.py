"""Choosing and checking the target device."""

from __future__ import annotations

import os

import torch


def resolve_device(device: "str | int | torch.device | None", present: bool = True) -> torch.device:
    """The target device for ``device``; ``None`` picks this rank's GPU (``LOCAL_RANK``, modulo the GPUs
    present, so ranks may share one) or the CPU. With ``present=False`` a CUDA device need not exist here (a
    map compiled for another machine; ``cuda`` alone is this process's current GPU, or ``cuda:0`` without one).

    Raises:
        ValueError: the device string is malformed, names a kind other than ``cuda``/``cpu``, asks for CUDA
            where there is none, or names a GPU index that does not exist (the last two only if ``present``).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        rank = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        return torch.device("cuda", rank % torch.cuda.device_count())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a device: {err}. Pass e.g. 'cuda:0' or 'cpu'") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device {device!r}: offload_map targets 'cuda' or 'cpu', not {dev.type!r}")
    if not present:  # as below, but the GPU may be another machine's
        if dev.index is not None:
            return dev
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: CUDA is not available on this machine; pass device='cpu' (with a "
            "device map too: dispatch_pipeline(pipe, device='cpu', device_map=...)) to run the same plan on the CPU"
        )
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) exist (indices 0..{torch.cuda.device_count() - 1})"
        )
    return torch.device("cuda", index)
