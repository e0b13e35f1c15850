"""A unit whose weights live in a host buffer, and the one owner of where its module tensors point.

A unit is a pinned component or a streamed block. Its packed bytes (``HostBuffer``) split at ``kept``:

- the **head**, bytes ``[0, kept)`` (whole submodules; all of a pinned component or of a block the planner
  keeps resident), held in a device buffer of its own between ``fetch_head`` and ``drop_head``;
- the **tail**, bytes ``[kept, nbytes)``, streamed through the slots of its DiT's ring.

Tail states (like FSDP2's ``FSDPParam``: the copy is issued early, parameters are swapped only after the wait):

====== ============================================= ==================================
state  what happened                                  the module's tail tensors view
====== ============================================= ==================================
HOST   nothing in flight                              the host buffer
LOADED a copy into ``slot`` was issued (may be         the host buffer
       running): the next step's prefetch is this
IN_USE the compute stream waits for that copy          the slot
====== ============================================= ==================================

``load`` (HOST -> LOADED), ``wait`` (LOADED -> IN_USE), ``release`` (IN_USE -> HOST) and ``cancel``
(LOADED -> HOST) are each safe to call twice. A module therefore points into a slot only between the wait
and the end of its block's forward: at every forward boundary, and to any code outside the block, its
tensors are host tensors (or the head's device tensors).

Ownership: ``head`` (device ``uint8``) is allocated here on the compute stream current at ``fetch_head`` (its
allocation stream) and filled on the copy stream, which first waits for that stream (the memory may have
served earlier work); the compute stream waits for the copy before anything reads the head. ``drop_head``
makes the allocation stream wait for the current stream, where the head was last read (a component runs
on one stream), before letting the buffer go. Slots belong to the ring's ``SlotPool``; the unit only
copies into one (after its ``free`` event), records its ``ready`` event, waits on it, and records ``free``.
A unit coded losslessly and read from a checkpoint may hold no raw bytes at all (``host`` is then a
``mapped_host.MappedHost``: at rest its tensors view the checkpoint file).
A coded unit (``coded``, a ``coded_host.CodedHost`` or ``fp8_host.Fp8Host``) copies its code instead, through
the pool's staging buffers, and the decode stream decodes it into the slot (and, for an exact code, into the
head); ``ready`` is then recorded on the decode stream, after the last decode. Cancelling a coded load makes
the copy stream wait for that ``ready``, so no later copy into its slot overtakes its decodes.
"""

from __future__ import annotations

from enum import Enum

import torch

from ..collect.tensors import TensorRef, is_dtensor
from .coded_host import CodedHost, worth_keeping
from .host_buffer import HostBuffer, home_device, split_points
from .mapped_host import MappedHost
from .slots import Slot

_PARAM, _BUFFER, _SHARD = "parameter", "buffer", "DTensor shard"


def _targets(ref: TensorRef) -> tuple:
    # What a bind writes to, per slot: a Parameter's ``.data`` (keeps its identity), a buffer table's entry, or a
    # DTensor's local shard (one write serves every slot holding that DTensor).
    if is_dtensor(ref.tensor):
        return ((_SHARD, ref.tensor, None),)
    return tuple(
        (_PARAM, module._parameters[name], name) if is_param else (_BUFFER, module._buffers, name)
        for module, name, is_param in ref.slots()
    )


class TailState(Enum):
    HOST = "host"
    LOADED = "loaded"
    IN_USE = "in use"


class OffloadedUnit:
    """The tensors ``refs`` of unit ``path``, stored in ``host`` (see the module docstring).

    Args:
        path: the unit's module path (for messages and profiler ranges).
        refs: its tensors, in the host buffer's order.
        host: the packed host buffer (owned by the runtime's ``HostStore``); see ``map_to`` for the other kind.
        ordering: the dispatch's ``CudaOrdering``/``SyncOrdering``.
        kept: bytes of the head (a split point, 0, or ``host.nbytes``).
        coded: the unit's bytes as ``compression`` stores them (``coded_host.CodedHost``, ``fp8_host.Fp8Host``),
            copied instead of ``host``; or None.
    """

    def __init__(
        self, path: str, refs: list[TensorRef], host: HostBuffer, ordering, kept: int = 0, coded: "CodedHost | None" = None
    ) -> None:
        self.path = path
        self.refs = refs
        self.host = host
        self.coded = coded
        self.ordering = ordering
        self.original_devices = [ref.local.device for ref in refs]
        self.host_views = host.at_rest()
        self.head: torch.Tensor | None = None
        self.head_stream = None
        self.state = TailState.HOST
        self.slot: Slot | None = None
        self.kept = 0
        self.split = 0  # index of the first tail tensor
        self.bound = False  # whether the module's tensors point into this unit's memory yet
        self._targets: list[tuple] = []  # per tensor and slot: (kind, holder, name), see ``_targets``
        self.set_kept(kept)

    @property
    def nbytes(self) -> int:
        return self.host.nbytes

    @property
    def streamed_bytes(self) -> int:
        """Bytes of the tail, which go through a slot."""
        return self.host.nbytes - self.kept

    def split_points(self) -> tuple[int, ...]:
        """Where the unit's bytes can be cut between whole submodules (``host_buffer.split_points``)."""
        return split_points([ref.qualname for ref in self.refs], self.host.regions, self.path)

    def set_kept(self, kept: int) -> None:
        """Keep the first ``kept`` bytes as the head from now on. Only with no head on the device and the tail on
        the host (the ring changes residency at a forward boundary, after ``settle``)."""
        assert self.head is None and self.state is TailState.HOST, f"{self.path}: residency changed while in use"
        self.kept = kept
        self.split = self.host.first_at(kept)

    def _bind(self, first: int, views: list[torch.Tensor]) -> None:
        # The hot path (twice per block and step): each slot's Parameter, buffer table or DTensor, read once by
        # bind_host.
        for targets, view in zip(self._targets[first:], views):
            for kind, holder, name in targets:
                if kind is _PARAM:
                    holder.data = view
                elif kind is _BUFFER:
                    holder[name] = view
                else:
                    holder._local_tensor = view

    def bind_host(self) -> None:
        """Point every tensor at the host buffer (at dispatch, and after the weights changed), and note what later
        binds write to: the Parameters (``.data`` keeps their identity from here on) and buffer tables."""
        self.host_views = self.host.at_rest()
        for ref, view in zip(self.refs, self.host_views):
            ref.bind(view)  # may replace a meta Parameter with a new one, so the targets are read after
        self._targets = [_targets(ref) for ref in self.refs]
        self.bound = True

    # -- head ----------------------------------------------------------------------------------------------

    def fetch_head(self, blocking: bool = False, staging=None) -> int:
        """Copy the head to a device buffer of its own and point its tensors there; returns the host bytes copied
        (0 if the head is there already, or empty). ``blocking``: the host waits for the copy (HSDP). ``staging``:
        the pool's ``Staging``, for a coded unit."""
        if self.head is not None or not self.kept:
            return 0
        ordering = self.ordering
        with torch.profiler.record_function(f"offload_map::load {self.path}"):
            self.head_stream = ordering.compute_stream()
            head = torch.empty(self.kept, dtype=torch.uint8, device=ordering.device)
            allocated, ready = ordering.event(), ordering.event()
            ordering.record_compute(allocated)
            ordering.copy_waits(allocated)
            coded = self.coded is not None and self.coded.exact  # an fp8 head is copied exact
            with ordering.on_copy_stream():
                if coded:
                    self.coded.copy(head, 0, self.kept, staging)
                    ordering.record_decode(ready)
                else:
                    head.copy_(self.host.flat[: self.kept], non_blocking=self.host.pinned)
                    ordering.record_copy(ready)
            ordering.compute_waits(ready)
            if blocking and ordering.asynchronous:
                ready.synchronize()
        self._bind(0, self.host.views(head, 0, self.kept))
        self.head = head
        return self.coded.part_bytes(0, self.kept) if coded else self.kept

    def keep_head_edits(self) -> None:
        """Copy the head's tensors as they are (edited in place on the device, or given new data of the same layout,
        as peft's safe merge does) into the host storage, before the head goes for good (``Runtime`` restoring:
        ``remove()``, or ``refresh()`` dispatching again): ``drop_head`` points them back at it. A tensor of another
        shape, strides or dtype now is left as ``restore`` leaves it. The host has waited for the device."""
        if self.head is None:
            return
        for index, ref in enumerate(self.refs[: self.split]):
            tensor = ref.local.detach()
            if not tensor.numel() or self.host.holds(index, tensor):
                continue
            try:
                self.host.write(index, tensor)
            except ValueError:
                pass  # another layout: restoring must still finish (a retry would meet it again)

    def drop_head(self) -> None:
        """Point the head's tensors back at the host buffer and let its device buffer go. Safe to call twice."""
        if self.head is None:
            return
        self._bind(0, self.host_views[: self.split])
        if self.ordering.asynchronous and self.head_stream != self.ordering.compute_stream():
            self.head_stream.wait_stream(self.ordering.compute_stream())
        self.head = self.head_stream = None

    # -- tail ----------------------------------------------------------------------------------------------

    def load(self, slot: Slot, copier, timed: list | None = None) -> int:
        """HOST -> LOADED: issue the copy of the tail into ``slot`` on the copy stream, after the slot's last reader;
        returns the host bytes this rank copied (0 when the slot still holds the tail from an earlier load). With
        ``timed`` (calibration), append ``(bytes, start mark, end mark)`` of the copy, marked on the copy stream."""
        if self.state is not TailState.HOST:
            return 0
        if slot.holds is self:
            self.slot, self.state = slot, TailState.LOADED
            return 0
        # A copy that raises (a collective timing out, an interrupt) leaves the unit on the host and the slot
        # holding nothing known: both are set only once the copy is issued.
        slot.holds = None
        ordering = self.ordering
        nbytes = self.nbytes - self.kept
        with torch.profiler.record_function(f"offload_map::load {self.path}"):
            ordering.copy_waits(slot.free)
            with ordering.on_copy_stream():
                start = ordering.stamp() if timed is not None else None
                if self.coded is None:
                    copier(slot.buffer, self.host.flat[self.kept :], self.host.pinned, self.path)
                    ordering.record_copy(slot.ready)
                    end = ordering.stamp() if timed is not None else None
                else:  # the planner counts raw bytes, over the time to the last decode
                    self.coded.copy(slot.buffer, self.kept, self.nbytes, slot.staging)
                    with ordering.on_decode_stream():
                        ordering.record_decode(slot.ready)
                        end = ordering.stamp() if timed is not None else None
                if timed is not None:
                    timed.append((nbytes, start, end))
        slot.holds, self.slot, self.state = self, slot, TailState.LOADED
        if self.coded is not None:
            return self.coded.part_bytes(self.kept, self.nbytes)
        return copier.host_bytes(nbytes)

    def wait(self) -> None:
        """LOADED -> IN_USE: the compute stream waits for the tail's copy, then the tail's tensors view the slot."""
        if self.state is not TailState.LOADED:
            return
        slot = self.slot
        self.ordering.compute_waits(slot.ready)
        views = slot.views.get(self)
        if views is None:
            views = slot.views[self] = self.host.views(slot.buffer, self.kept)
        self._bind(self.split, views)
        self.state = TailState.IN_USE

    def release(self) -> None:
        """IN_USE -> HOST: mark on the compute stream that the block is done with its slot, and point the tail back
        at the host buffer. The slot keeps its bytes (``slot.holds``) until another unit is loaded into it."""
        if self.state is not TailState.IN_USE:
            return
        self.ordering.record_compute(self.slot.free)
        self._bind(self.split, self.host_views[self.split :])
        self.slot, self.state = None, TailState.HOST

    def cancel(self) -> None:
        """LOADED -> HOST: drop a load that will not be used (the slot may be given to another unit; the copy stays
        ordered before any later copy into it, on the copy stream; a coded load's decodes, on the decode stream, are
        put before them here)."""
        if self.state is TailState.LOADED:
            if self.coded is not None:
                self.ordering.copy_waits(self.slot.ready)
            self.slot, self.state = None, TailState.HOST

    # -- host storage --------------------------------------------------------------------------------------

    def sync_to_host(self) -> None:
        """Copy into the host buffer every tensor that does not view it (a head on the device, or a tensor the user
        replaced), then bring the head, if on the device, back in line with the host. The tail is on the host
        (the ring settled it) and the host has waited for the copy stream.

        Raises:
            ValueError: a tensor's shape, strides or dtype changed since dispatch (re-dispatch instead).
        """
        for index, ref in enumerate(self.refs):
            tensor = ref.local.detach()
            if self.host.holds(index, tensor):
                continue  # in-place edits already landed in the host buffer
            try:
                self.host.write(index, tensor)
            except ValueError as err:
                raise ValueError(f"{ref.qualname} {err} since dispatch; remove() and dispatch again to repack it") from None
        if self.coded is not None:  # in-place edits do not show: code the bytes anew whatever changed
            self.coded.encode(self.host.packed())
            self.coded = worth_keeping(self.coded)  # None where the new weights do not compress: stream them as they are
            if self.coded is None:
                self._unmap()
        # A coded head needs its ring's staging buffer: the ring fetches it again (``Runtime.refresh``).
        head = self.head is not None and self.coded is None
        self.drop_head()
        self.bind_host()
        if head:
            self.fetch_head()

    def drop_code(self) -> None:
        """Let the code go (the host waited for the copy stream): the unit streams no more (``detach``, ``restore``),
        or streams raw from now on (``stream_raw``)."""
        if self.coded is not None:
            self.coded.release()
            self.coded = None

    def stream_raw(self) -> None:
        """Stream the unit's current bytes as they are from now on (the host waited for the copy stream)."""
        self._unmap()
        self.drop_code()

    def map_to(self, mapped: MappedHost) -> None:
        """Hold the unit as its code only (``mapped_host``): its tensors view ``mapped`` at rest, and the raw host
        buffer goes. Only while the unit is coded, at rest (no head, its tail on the host), and no copy reads the
        buffer."""
        assert self.coded is not None and self.head is None and self.state is TailState.HOST, self.path
        self._set_host(mapped)

    def _unmap(self) -> None:
        # A unit that streams raw needs its bytes in a host buffer of its own again.
        if isinstance(self.host, MappedHost):
            self._set_host(self.host.to_buffer())

    def _set_host(self, host) -> None:
        old, self.host = self.host, host
        self.bind_host()
        if self.head is not None:  # a kept part stays on the device (an interrupted refresh leaves it there)
            self._bind(0, host.views(self.head, 0, self.kept))
        old.release()

    def restore(self, loaded: bool) -> None:
        """Give every tensor its own storage on its original device again, with the host buffer's bytes. Tensors
        read from a checkpoint (originally on the meta device) go to the CPU when ``loaded``, else back to meta.
        A unit held only as its code (``MappedHost``) gives a tensor that viewed its file before dispatch
        (``from_pretrained``'s) that view back, edits included: the pipeline is as it was, and a dispatch that
        follows (``refresh()``'s) holds the unit so again. A tensor replaced while dispatched (no longer a view of
        the host storage) stays as it is. A unit never bound (a rank waiting for a shared copy that failed) keeps
        the tensors it has."""
        for index, (ref, device) in enumerate(zip(self.refs if self.bound else [], self.original_devices)):
            current = ref.local.detach()
            if current.numel() and not self.host.holds(index, current):
                continue  # replaced while dispatched (a new Parameter or buffer): the new one is the value now
            region = self.host.regions[index]
            home = home_device(device, loaded)
            if isinstance(self.host, MappedHost) and home.type == "cpu" and self.host.lent[index]:
                ref.bind(self.host.mapped[index])
                continue
            raw = self.host.raw(index)
            fresh = torch.empty(raw.numel(), dtype=raw.dtype, device=home)
            if not fresh.is_meta:
                fresh.copy_(raw)
            ref.bind(fresh.as_strided(region.shape, region.stride))
        self.host_views = []
        self.bound = False
