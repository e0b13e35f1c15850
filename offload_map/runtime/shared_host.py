"""One host copy of the offloaded weights for all ranks of a host (``accelerate launch``, torchrun).

The copy is an anonymous shared-memory file (``memfd_create``): it has no name in ``/dev/shm`` or anywhere
else, so nothing can be left behind, whatever happens to the ranks; the kernel frees it when the last
process that maps it exits or unmaps it, killed ones included. Other ranks of the same user reach it
through ``/proc/<creator pid>/fd/<fd>`` while the creator holds that descriptor open, which is only
during dispatch; other users cannot open it (the same check as for ptrace).

Protocol (collective: every rank of the process group calls ``HostCopy.open`` and, later, ``ready``):

1. ranks exchange (host name, layout fingerprint); ranks of one host with the same layout form a group,
   the lowest rank of each group creates the region;
2. the creator sizes and maps it and offers (pid, fd); the others open and map it;
3. the creator fills it while every rank builds its views on it (and page-locks them for its device);
4. ``ready()``: a barrier; then the creator closes its descriptor.

The exchange runs on a gloo group of its own: it moves Python objects, and it works whatever the default
backend is (NCCL refuses two ranks on one GPU, which is how ranks share the lent H100).

Ownership: ``HostCopy`` owns the mapping (``flat``); every ``PackedTensors`` of the dispatch holds a view of
it, and the mapping stays alive until the last view goes. A rank that cannot map the region (no
``memfd_create``, no ``/proc``, not enough memory) gets ``flat = None``, packs its own copy, and warns.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger("offload_map")

# A sharded load waits for every rank of the host; a rank that stopped must not leave the others hanging.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
PACK_TIMEOUT = timedelta(minutes=15)


class HostCopy:
    """This rank's view of the host copy shared with the other ranks of its host.

    Attributes:
        flat: the shared region as a ``uint8`` tensor, or ``None`` where this rank packs its own copy.
        creator: whether this rank created (and fills) the shared region.
        ranks: the global ranks of this host with the same layout.
    """

    def __init__(
        self, flat: torch.Tensor | None, creator: bool, ranks: list[int], fd: int | None, group, shard_group=None
    ) -> None:
        self.flat = flat
        self.creator = creator
        self.ranks = ranks
        self._fd = fd
        self._group = group
        self.shard_group = shard_group  # the host's ranks, for sharded block loads (``sharded_copy``), or None

    @classmethod
    def open(cls, nbytes: int, fingerprint: str, share: bool | None, shard_backend: str | None = None) -> "HostCopy | None":
        """Map the region shared by this host's ranks (collective); ``None`` where nothing is shared.

        Args:
            nbytes: the region's size.
            fingerprint: identifies the layout; only ranks with equal fingerprints share.
            share: ``True`` requires sharing (warns where impossible), ``None`` shares when several ranks of
                one host run, ``False`` never shares (no collective call is made unless sharding).
            shard_backend: also make a group of this host's ranks, on this backend (``"nccl"``, ``"gloo"``),
                for sharded block loads.

        Raises:
            ValueError: ``share=True`` without an initialised process group.
        """
        if share is False and not shard_backend:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            if share or shard_backend:
                raise ValueError(
                    "share_host_copy=True and shard_copies=True need torch.distributed initialised (run "
                    "under accelerate launch or torchrun and create accelerate's PartialState() first)"
                )
            return None
        world, rank = dist.get_world_size(), dist.get_rank()
        # Packing a model can take minutes (a slow disk): the exchange waits as long as that, and no longer.
        group = dist.new_group(backend="gloo", timeout=PACK_TIMEOUT)
        me = (socket.gethostname(), fingerprint, nbytes)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, me, group=group)
        ranks = [r for r, other in enumerate(everyone) if other == me]
        shard_group = _host_groups(everyone, rank, shard_backend) if shard_backend else None
        if share is False:
            return cls(None, False, ranks, None, group, shard_group)
        creator = ranks[0] == rank
        flat, fd = _create(nbytes) if creator and len(ranks) > 1 and nbytes else (None, None)  # empty maps still join
        offers: list = [None] * world
        dist.all_gather_object(offers, (os.getpid(), fd) if fd is not None else None, group=group)
        if not creator and offers[ranks[0]] is not None:
            flat = _join(*offers[ranks[0]], nbytes, rank, ranks[0])
        if flat is None and len(ranks) > 1 and share:
            logger.warning("offload_map: rank %d packs its own host copy of the weights", rank)
        if len(ranks) == 1 and share:
            logger.warning("offload_map: rank %d is alone on its host with this model; nothing to share", rank)
        return cls(flat, creator and flat is not None, ranks, fd, group, shard_group)

    @property
    def fills(self) -> bool:
        """Whether this rank writes weights: it created the region, or packs its own copy."""
        return self.creator or self.flat is None

    def ready(self, ok: bool) -> None:
        """Wait until every rank has packed (the creator: filled the region), collectively; then the creator lets
        go of its descriptor.

        Raises:
            RuntimeError: another rank failed while packing (this one passed ``ok=True``); it reports its own error.
        """
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, ok, group=self._group)
        self.close()
        failed = [rank for rank, state in enumerate(states) if not state]
        if ok and failed:
            raise RuntimeError(f"rank(s) {failed} failed while packing their host copy (see their error); this rank stops too")

    def close(self) -> None:
        """Close the creator's descriptor (the mapping stays while views of it live). Safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        """After the dispatch ends: close the descriptor and destroy this dispatch's process groups (local)."""
        self.close()
        for group in (self._group, self.shard_group):
            if group is not None and dist.is_initialized():
                dist.destroy_process_group(group)
        self._group = self.shard_group = None


def _create(nbytes: int) -> tuple[torch.Tensor | None, int | None]:
    fd = None
    try:
        fd = os.memfd_create("offload_map", os.MFD_CLOEXEC)
        os.ftruncate(fd, nbytes)
        return _map(fd, nbytes), fd
    except (OSError, AttributeError) as err:
        if fd is not None:
            os.close(fd)
        logger.warning("offload_map: cannot create a shared host copy (%s); every rank keeps its own", err)
        return None, None


def _join(pid: int, fd: int, nbytes: int, rank: int, creator: int) -> torch.Tensor | None:
    try:
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            return _map(own, nbytes)
        finally:
            os.close(own)
    except OSError as err:
        logger.warning("offload_map: rank %d cannot map the host copy of rank %d (%s); it keeps its own", rank, creator, err)
        return None


def _host_groups(everyone: list, rank: int, backend: str):
    # new_group is collective over the whole world: every rank creates every host's group, in one order.
    mine = None
    for key in dict.fromkeys(everyone):
        members = [r for r, other in enumerate(everyone) if other == key]
        group = dist.new_group(members, backend=backend, timeout=COLLECTIVE_TIMEOUT)
        if rank in members:
            mine = group
    return mine


def _map(fd: int, nbytes: int) -> torch.Tensor:
    region = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return torch.frombuffer(region, dtype=torch.uint8)
