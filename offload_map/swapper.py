"""Model-level swapping: "cpu-pinned" components take turns on the device.

Ownership: each ``PinnedComponent`` owns, while loaded, one device ``uint8`` buffer holding the whole
component, allocated by ``load`` from the caching allocator on the compute stream and filled by one
host-to-device copy on that stream (the component is needed at once, so there is nothing to overlap).
``evict`` rebinds the component to its host buffer and drops the device buffer; the allocator reuses it
in stream order. Weights are read-only at inference, so eviction copies nothing back.
"""

from __future__ import annotations

import torch

from .host_storage import PackedTensors
from .placement import Role
from .report import TransferStats


class PinnedComponent:
    """A component that lives in (pinned) host memory and is copied to ``device`` while it runs.

    Args:
        name: component name.
        role: its role (decides what it excludes).
        storage: its packed host storage.
        device: the target device.
        blocking: copy synchronously even from pinned memory (HSDP, where collectives read the weights at once).
        stats: transfer counters to update.
    """

    def __init__(self, name: str, role: Role, storage: PackedTensors, device: torch.device, blocking: bool, stats: TransferStats) -> None:
        self.name = name
        self.role = role
        self.storage = storage
        self.device = device
        self.blocking = blocking
        self.stats = stats
        self.device_buffer: torch.Tensor | None = None

    @property
    def loaded(self) -> bool:
        return self.device_buffer is not None

    def load(self) -> None:
        """Copy the component to the device and point its tensors there. Safe to call twice."""
        if self.loaded:
            return
        with torch.profiler.record_function(f"offload_map::load {self.name}"):
            buffer = torch.empty(self.storage.nbytes, dtype=torch.uint8, device=self.device)
            buffer.copy_(self.storage.flat, non_blocking=self.storage.pinned and not self.blocking)
        self.storage.bind(self.storage.views(buffer))
        self.device_buffer = buffer
        self.stats.add_component(self.storage.nbytes)

    def evict(self) -> None:
        """Point the component back at host memory and drop its device copy. Safe to call twice."""
        if not self.loaded:
            return
        self.storage.bind_host()
        self.device_buffer = None
        self.stats.component_evictions += 1


class Swapper:
    """Makes room for a component: evicts every loaded pinned component its role excludes, then loads it.

    The resident blocks of a streamed DiT (its ``SlotRing.resident``) count as part of that DiT here:
    they leave when an encoder runs and come back when the DiT runs again.

    Example:
        ``swapper.activate("transformer")`` before the DiT runs evicts the text encoders (and any other
        DiT, e.g. Wan2.2's second expert) and, if the transformer is pinned, loads it.
    """

    def __init__(self, roles: dict[str, Role], pinned: dict[str, PinnedComponent], rings: dict) -> None:
        self.roles = roles
        self.pinned = pinned
        self.rings = rings

    def activate(self, name: str) -> None:
        """Before component ``name`` runs: evict what its role excludes, then load it (and its resident blocks)."""
        role = self.roles[name]
        for other in self.pinned.values():
            if other.name != name and other.loaded and role.excludes(other.role):
                other.evict()
        for other, ring in self.rings.items():
            if other != name and role.excludes(self.roles[other]):
                ring.evict_residents()
        if name in self.pinned:
            self.pinned[name].load()
        if name in self.rings:
            self.rings[name].load_residents()
