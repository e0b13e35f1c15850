"""Model-level swapping: components take turns on the device, by role.

A ``"cpu-pinned"`` component is an ``OffloadedUnit`` whose head is all of it: ``fetch_head`` before it runs,
``drop_head`` when a component its role excludes runs. A streamed component's slots and kept parts
(``BlockRing.enter``/``leave``) come and go the same way. Weights are read-only at inference, so leaving
copies nothing back.
"""

from __future__ import annotations

from ..collect.components import Role
from .report import TransferStats
from .ring import BlockRing
from .unit import OffloadedUnit


class Swapper:
    """Makes room for a component: drops what its role excludes, then brings it (and its kept parts) in.

    Args:
        roles: component name -> role.
        pinned: component name -> the unit of a ``"cpu-pinned"`` component.
        rings: component name -> the ring of a streamed DiT.
        blocking: the host waits for component copies (HSDP, where collectives read the weights at once).
        stats: transfer counters.

    Example:
        ``swapper.activate("transformer")`` before the DiT runs drops the text encoders (and any other DiT,
        e.g. Wan2.2's second expert) and, if the transformer is pinned, copies it in.
    """

    def __init__(
        self,
        roles: dict[str, Role],
        pinned: dict[str, OffloadedUnit],
        rings: dict[str, BlockRing],
        blocking: bool,
        stats: TransferStats,
    ) -> None:
        self.roles = roles
        self.pinned = pinned
        self.rings = rings
        self.blocking = blocking
        self.stats = stats

    def activate(self, name: str) -> None:
        """Before component ``name`` runs: drop what its role excludes, then load it (and its kept parts)."""
        role = self.roles[name]
        for other, unit in self.pinned.items():
            if other != name and unit.head is not None and role.excludes(self.roles[other]):
                unit.drop_head()
                self.stats.component_evictions += 1
        for other, ring in self.rings.items():
            if other != name and role.excludes(self.roles[other]):
                ring.leave()
        if name in self.pinned:
            copied = self.pinned[name].fetch_head(self.blocking)
            if copied:
                self.stats.add_component(copied)
        if name in self.rings:
            self.rings[name].enter()

    def release(self, name: str) -> None:
        """Let component ``name`` leave the device, as when a component that excludes it runs."""
        if name in self.pinned and self.pinned[name].head is not None:
            self.pinned[name].drop_head()
            self.stats.component_evictions += 1
        if name in self.rings:
            self.rings[name].leave()

    def on_device(self, name: str) -> bool:
        """Whether component ``name`` is on the device now: resident, pinned and loaded, or streamed and active (its
        slots, kept parts and pinned weights outside its blocks there)."""
        if name in self.rings:
            return self.rings[name].active
        unit = self.pinned.get(name)
        return unit is None or unit.head is not None or not unit.nbytes
