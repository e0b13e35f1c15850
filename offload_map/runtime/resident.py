"""Resident weights: the tensors of ``"gpu"`` entries, moved to the device for the whole dispatch.

Ownership: ``ResidentTensors`` moves each tensor (read from its checkpoint first when it is on the meta
device, through one tensor-sized host buffer) and remembers where it came from; ``restore`` moves it back,
bit for bit, after the host waited for the device (the caller's duty).
"""

from __future__ import annotations

import torch

from ..collect.tensors import TensorRef
from ..planning.bind import Unit
from .host_buffer import home_device
from .undo import undo_each


class ResidentTensors:
    """The tensors moved to the device, and where each came from."""

    def __init__(self) -> None:
        self.moved: list[tuple[TensorRef, torch.device]] = []

    def move(self, units: list[Unit], device: torch.device, source) -> None:
        """Move the tensors of ``units`` to ``device``; ``source`` reads those on the meta device (or None)."""
        for unit in units:
            for ref in unit.tensors:
                tensor = ref.local.detach()  # a DTensor moves by its local shard
                if tensor.device == device:
                    continue
                self.moved.append((ref, tensor.device))
                if source is not None and source.covers(ref):
                    tensor = torch.empty(tensor.shape, dtype=tensor.dtype)
                    source.read_into(ref, tensor)
                ref.bind(tensor.to(device))

    def restore(self, loaded: bool) -> None:
        """Move every tensor back to where it was (read from a checkpoint: to the CPU if ``loaded``, else meta).
        Safe to call twice."""

        def back(moved: tuple[TensorRef, torch.device]) -> None:
            ref, device = moved
            ref.bind(ref.local.detach().to(home_device(device, loaded)))

        undo_each(self.moved, back)
