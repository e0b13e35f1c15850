"""The runtime: carries out an ``ExecutionPlan`` and undoes it. It decides no policy: placements, the window,
exclusions and every re-plan come from the plan and its callers.

A ``Runtime`` is four parts, built in this order, each step pushing its undo on one stack that ``restore``
runs backwards (also when a later step fails):

1. ``host`` (``HostStore``): every pinned component and streamed block packed into its host buffer;
2. ``rings`` (``BlockRing`` per streamed DiT): the slots and the prefetcher;
3. ``resident`` (``ResidentTensors``): the ``"gpu"`` tensors moved to the device;
4. ``hooks`` (``HookSet``): accelerate hooks on every component and streamed block, and the guards.

Public surface for policy (``offload_map.auto``): ``arm_calibration`` (time a component's next forward),
``watch_calls`` (how often each component runs in a call), ``agree`` (one decision for all ranks that stream
together), ``set_residency`` (apply a plan at a forward boundary).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from ..mapping.memory import device_footprint
from ..mapping.sizes import human_bytes
from ..planning.bind import ExecutionPlan
from ..planning.cost_model import ModelCost
from .calibration import BlockTimer
from .calls import CallWatch
from .coded_host import CodedHost
from .hooks import BlockHook, ComponentHook, HookSet
from .host_buffer import HostBuffer
from .host_store import HostStore
from .mapped_host import MappedHost
from .report import CodedTotals, SetupTimes, TransferStats
from .resident import ResidentTensors
from .ring import BlockRing
from .sharded_copy import DirectCopy, ShardedCopy
from .streams import ordering_for
from .swapper import Swapper
from .undo import undo_each

logger = logging.getLogger("offload_map")


class Runtime:
    """The live state of one dispatch (see the module docstring).

    Args:
        plan: the bound plan.
        pin_memory: page-lock host buffers (CUDA only).
        blocking: the host waits for component copies (HSDP).
        progress: show a progress bar while packing (None: when it takes over a second).
        source: a ``WeightSource`` for tensors on the meta device, or None.
        share_host_copy: share one host copy with this host's ranks (see ``dispatch_pipeline``).
        shard_copies: each rank copies 1/N of every block and the ranks all-gather the rest.
        offload_folder: where blocks coded losslessly that view no file keep their raw bytes at rest (or None).
    """

    def __init__(
        self,
        plan: ExecutionPlan,
        *,
        pin_memory: bool = True,
        blocking: bool = False,
        progress: bool | None = None,
        source=None,
        share_host_copy: bool | None = False,
        shard_copies: bool = False,
        offload_folder=None,
    ) -> None:
        self.plan = plan
        self.device = plan.device
        self.ordering = ordering_for(self.device)
        self.stats = TransferStats()
        self.host: HostStore | None = None
        self.copier = DirectCopy()
        self.rings: dict[str, BlockRing] = {}
        self.hooks = HookSet()
        self.built = False
        self._undo: list[Callable[[], None]] = []
        self.restoring = False  # a restore began and did not finish (``restore``)
        try:
            self._build(
                pin_memory and self.device.type == "cuda",
                blocking,
                progress,
                source,
                share_host_copy,
                shard_copies,
                offload_folder,
            )
        except BaseException:
            self.restore()
            raise
        self.built = True

    def _build(self, pin: bool, blocking: bool, progress, source, share_host_copy, shard_copies: bool, folder) -> None:
        plan, ordering = self.plan, self.ordering
        backend = ("nccl" if self.device.type == "cuda" else "gloo") if shard_copies else None
        self.host = HostStore(plan, ordering, pin, source, share_host_copy, backend, progress, folder)
        self._undo.append(self._restore_host)
        self.copier = _copier(self.host.host_copy)
        for ring in plan.rings:
            units = [self.host.units[block.path] for block in ring.blocks]
            self._undo.append(lambda name=ring.component: self._free_ring(name))
            self.rings[ring.component] = self._within_memory(
                f"allocating {ring.window} slots for {ring.component!r}",
                BlockRing,
                ring.component,
                units,
                ring.window,
                ordering,
                self.copier,
                self.stats,
            )
        self._undo.append(self._keep_head_edits)  # undone before the rings let their heads go
        resident = ResidentTensors()
        self._undo.append(lambda: resident.restore(self.built))
        self._within_memory("moving resident modules", resident.move, plan.resident, self.device, source)
        roles = {c.name: c.role for c in plan.components}
        pinned = {plan.component_of(u.path).name: self.host.units[u.path] for u in plan.pinned}
        self.swapper = Swapper(roles, pinned, self.rings, blocking, self.stats)
        self.calls = CallWatch(roles)
        self._undo.append(self.hooks.remove)
        for comp in plan.components:
            ring = self.rings.get(comp.name)
            hook = ComponentHook(comp.name, self.device, self.swapper, ring, self.calls)
            self.hooks.attach(comp.module, hook)
            guard = self.hooks.guard(comp.name, comp.module) if ring is not None or comp.name in pinned else None
            self.hooks.wrap_entry_points(comp.module, hook, guard)
        for ring in self.rings.values():
            for index, unit in enumerate(ring.units):
                self.hooks.attach(plan.units[unit.path].module, BlockHook(ring, index, unit.path))

    def _free_ring(self, name: str) -> None:
        # Taken off once freed: an interrupt inside ``free`` leaves it for the next restore.
        if name in self.rings:
            self.rings[name].free()
            del self.rings[name]

    def _keep_head_edits(self) -> None:
        # Before any head leaves the device (a ring's kept parts, a pinned component loaded): restoring gives back
        # what was edited there. Into a host copy shared between ranks too: ranks change weights together (a
        # refresh() is collective), so what another rank may still stream from gets the same bytes.
        for unit in self.host.units.values():
            unit.keep_head_edits()

    def _restore_host(self) -> None:
        for unit in self.host.units.values():
            unit.drop_head()
        self.host.restore()
        self.host.release_shared()

    # -- what the handle reports -----------------------------------------------------------------------------

    @property
    def slot_bytes(self) -> int:
        """Device memory the slots of every streamed component hold while it runs (components that take turns hold
        theirs in turn)."""
        return sum(ring.device_bytes for ring in self.rings.values())

    @property
    def coded(self) -> CodedTotals | None:
        """What ``compression`` coded (None without it)."""
        if not self.plan.compression:
            return None
        every = [unit for ring in self.rings.values() for unit in ring.units]
        units = [unit for unit in every if unit.path in self.plan.compression]
        coded = [unit.coded for unit in units if unit.coded is not None]
        mapped = sum(isinstance(unit.host, MappedHost) for unit in units)
        return CodedTotals(
            len(units), len(coded), sum(c.raw_bytes for c in coded), sum(c.nbytes for c in coded), len(every) - len(units), mapped
        )

    @property
    def raw_beside_code(self) -> tuple[int, int]:
        """Blocks coded losslessly that hold their raw bytes in host memory too (built in memory rather than viewing
        a checkpoint file, ``mapped_host``), and those raw bytes."""
        units = [u for ring in self.rings.values() for u in ring.units if isinstance(u.coded, CodedHost)]
        raw = [u.host.nbytes for u in units if isinstance(u.host, HostBuffer)]
        return len(raw), sum(raw)

    @property
    def host_bytes(self) -> tuple[int, int]:
        """Bytes of host memory holding the weights of pinned components and streamed blocks: raw buffers (none for a
        block held only as its code) and codes."""
        units = list(self.host.units.values()) if self.host is not None else []
        raw = sum(unit.host.nbytes for unit in units if isinstance(unit.host, HostBuffer))
        return raw, sum(unit.coded.nbytes for unit in units if unit.coded is not None)

    @property
    def setup_times(self) -> SetupTimes:
        return self.host.times

    @property
    def host_copy(self):
        """The ``shared_host.HostCopy`` this rank streams from, or None."""
        return self.host.host_copy if self.host is not None else None

    @property
    def host_buffers(self) -> "list[HostBuffer | MappedHost]":
        """The host buffer of every pinned component and streamed block (a ``MappedHost`` for a block held only as
        its code)."""
        return self.host.buffers if self.host is not None else []

    def activate(self, name: str) -> None:
        """Bring component ``name`` onto the device as before its forward (what it excludes leaves first)."""
        self.swapper.activate(name)

    def release(self, name: str) -> None:
        """Let component ``name`` leave the device, as when a component that excludes it runs."""
        self.swapper.release(name)

    def on_device(self) -> list[str]:
        """Names of the components on the device now (``Swapper.on_device``)."""
        return [c.name for c in self.plan.components if self.swapper.on_device(c.name)]

    def modules_changed(self) -> bool:
        """Whether an offloaded component's parameters changed since the build (a LoRA was loaded or removed)."""
        return self.hooks.modules_changed()

    # -- policy's surface --------------------------------------------------------------------------------------

    def arm_calibration(self, name: str, on_done: Callable[[ModelCost], None], skip: int = 1) -> None:
        """Let ``skip`` forwards of DiT ``name`` go by, time the next one block by block, and hand its ``ModelCost`` to
        ``on_done`` at the end of that forward (a forward boundary, where ``set_residency`` may be called)."""
        ring = self.rings[name]
        other = self._outside_blocks(name)
        ring.arm(
            BlockTimer(
                self.ordering,
                ring.paths,
                [u.nbytes for u in ring.units],
                [u.split_points() for u in ring.units],
                other,
                on_done,
                skip,
            )
        )

    def watch_calls(self, listener: Callable[[dict[str, int]], None]) -> None:
        """Call ``listener`` with each component's forward count when a call of the pipeline ends
        (``calls.CallWatch``); it runs at that forward boundary, before the next call's first component."""
        self.calls.listeners.append(listener)

    @property
    def sharded(self) -> bool:
        """Whether blocks load sharded between ranks (``shard_copies``)."""
        return isinstance(self.copier, ShardedCopy)

    def agree(self, value):
        """The first rank's ``value`` on every rank that streams with this one (collective when sharded): ranks that
        load blocks together must make the same choices."""
        return self.copier.agree(value) if self.sharded else value

    def set_residency(self, name: str, kept: Mapping[str, int], window: int, stays: bool = False) -> None:
        """Keep the first ``kept[path]`` bytes of each named block of component ``name`` on the device (its whole size:
        the block stays whole; split points only) and stream the rest through ``window`` slots; with ``stays``, those
        kept bytes stay on the device while the components it excludes run (else they leave and come back). Call at
        a forward boundary (between forwards, or from ``arm_calibration``'s callback). A component that is not on the
        device is brought in once, as before its forward, and leaves again: running out of memory shows here, where
        it can fall back, and not in its next forward.

        Raises:
            torch.OutOfMemoryError: the device cannot hold it; every block of the DiT then streams through one slot.
        """
        ring = self.rings[name]
        index = {path: i for i, path in enumerate(ring.paths)}
        by_index = {index[path]: size for path, size in kept.items() if size}
        try:
            self._within_memory(f"re-planning {name!r}", self._apply_residency, ring, by_index, window, stays)
        except BaseException:
            try:
                ring.set_residency({}, 1)  # the smallest plan, which dispatch checked fits
            except Exception:  # noqa: BLE001  (the first error says what went wrong; the ring is off the device)
                logger.warning("%s: falling back to one slot failed too", name, exc_info=True)
            raise

    def _apply_residency(self, ring: BlockRing, kept: dict[int, int], window: int, stays: bool) -> None:
        ring.set_residency(kept, window, stays)
        if not ring.active:
            self.swapper.activate(ring.name)
            self.swapper.release(ring.name)

    # -- weights and lifetime ------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Bring the host buffers up to date with the modules' current weights (see ``OffloadHandle.refresh``)."""
        for ring in self.rings.values():
            ring.forget_contents()  # prefetched copies hold the old bytes
        self.ordering.wait_copies()  # the copy stream reads host buffers; none may be in flight while they change
        units, synced = list(self.host.units.values()), 0
        try:
            for unit in units:
                unit.sync_to_host()
                synced += 1
        except BaseException:
            # Interrupted: the units not coded anew would stream their old code beside the new weights of the
            # others; they stream their host bytes (the new weights, in place) instead, uncoded from now on.
            for unit in units[synced:]:
                unit.stream_raw()
            raise
        finally:
            for ring in self.rings.values():
                if ring.active:
                    ring.refit()

    def detach(self) -> None:
        """Remove every hook and point streamed blocks at their host buffers; other weights stay where they are."""
        self.hooks.remove()
        while self.rings:
            self.rings.popitem()[1].free()
        self._undo.clear()
        # The host buffers go (and are unregistered) when this runtime does: no copy may still read them.
        self.ordering.wait_copies()
        for unit in self.host.units.values():  # nothing reads the codes any more: let them go now
            unit.drop_code()

    def restore(self) -> None:
        """Remove the hooks and put every tensor back on its original device, bit for bit; free everything. Each
        step is taken off once done (each is safe to repeat), so restoring again after an interrupt finishes. A step
        that raises an error does not stop the others: the first error is raised once all were tried."""
        self.restoring = True  # until the last step: the hooks and guards may be gone already (``refresh``)
        # Work on any stream (a user's own included) may still read what is freed below.
        self.ordering.synchronize()
        undo_each(self._undo, lambda step: step())  # an error leaves it ``restoring``: a refresh() dispatches again
        self.restoring = False

    def _within_memory(self, what: str, fn, *args):
        try:
            return fn(*args)
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"out of device memory on {self.device} while {what}: this device map needs about "
                f"{human_bytes(self._footprint())} for resident weights and slots, plus activations. Give the device "
                f"more free memory, use a smaller window, or place more modules 'cpu-pinned'/'layer-window'. ({err})"
            ) from None

    def _outside_blocks(self, name: str) -> int:
        """Device bytes of streamed component ``name``'s weights outside its blocks while it runs: resident, or pinned
        (as its host buffer lays them out, which is what a load allocates)."""
        resident = sum(u.nbytes for u in self.plan.resident if self.plan.component_of(u.path).name == name)
        return resident + sum(self.host.units[u.path].nbytes for u in self.plan.pinned if u.path == name)

    def _footprint(self) -> int:
        resident = sum(u.nbytes for u in self.plan.resident)
        pinned = {u.path: u.nbytes for u in self.plan.pinned}
        return resident + sum(
            device_footprint(0, max(u.nbytes for u in ring.blocks), min(ring.window, len(ring.blocks)))
            + pinned.get(ring.component, 0)
            for ring in self.plan.rings
        )


def _copier(host_copy) -> "DirectCopy | ShardedCopy":
    if host_copy is None or host_copy.shard_group is None or len(host_copy.ranks) < 2:
        return DirectCopy()
    return ShardedCopy(host_copy.shard_group, host_copy.ranks.index(dist.get_rank()), len(host_copy.ranks))
