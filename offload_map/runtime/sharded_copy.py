"""How a streamed block gets from host memory into its slot: one copy, or 1/N per rank and an all-gather.

``DirectCopy`` copies the whole block over this rank's host-to-device link. ``ShardedCopy`` is for N
data-parallel ranks of one host that run the same DiT in lockstep (same blocks, same order): each rank
copies one N-th of the block (``chunk`` bytes at ``index * chunk``) from its host copy, and an all-gather
over the ranks' group fills the rest of the slot from the other ranks, so the block crosses N links at
once. The slot's first ``nbytes`` then hold exactly the host bytes, as a direct copy would: outputs are
bit-identical. Slots are padded to ``N * chunk`` bytes; the padding receives the unused tail of the last
rank's chunk and is never viewed.

The all-gather writes straight into the slot, the rank's own chunk being its input in place (a view of
the output): no tensor is allocated per block. Ownership: the copier owns nothing but its group;
``OffloadedUnit.load`` calls it on the copy stream (the collective is ordered there too), the slot's
``ready`` event is recorded after it. A collective that fails or times out (another rank stopped, or the
ranks diverged) raises a ``RuntimeError`` naming the block.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from .host_buffer import ALIGN

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class DirectCopy:
    """The whole block over this rank's link."""

    def slot_bytes(self, largest: int) -> int:
        return largest

    def host_bytes(self, nbytes: int) -> int:
        """Bytes this rank reads from host memory for a block of ``nbytes``."""
        return nbytes

    def __call__(self, buffer: torch.Tensor, src: torch.Tensor, pinned: bool, path: str) -> None:
        """Copy the host bytes ``src`` (the streamed part of block ``path``) to the start of ``buffer``."""
        buffer[: src.numel()].copy_(src, non_blocking=pinned)


class ShardedCopy:
    """One N-th of the block per rank, then an all-gather (see the module docstring).

    Args:
        group: the process group of the ranks that share the work (all of them call every load).
        index: this rank's position in ``group``.
        size: the number of ranks in ``group``.
    """

    def __init__(self, group, index: int, size: int) -> None:
        self.group = group
        self.index = index
        self.size = size

    def chunk(self, nbytes: int) -> int:
        return -(-nbytes // (self.size * ALIGN)) * ALIGN

    def slot_bytes(self, largest: int) -> int:
        return self.chunk(largest) * self.size

    def host_bytes(self, nbytes: int) -> int:
        chunk = self.chunk(nbytes)
        return max(0, min(nbytes, (self.index + 1) * chunk) - self.index * chunk)

    def __call__(self, buffer: torch.Tensor, src: torch.Tensor, pinned: bool, path: str) -> None:
        nbytes = src.numel()
        chunk = self.chunk(nbytes)
        gathered = buffer[: chunk * self.size]
        start = self.index * chunk
        own = gathered[start : start + chunk]
        mine = self.host_bytes(nbytes)
        if mine:
            own[:mine].copy_(src[start : start + mine], non_blocking=pinned)
        try:
            if buffer.device.type == "cpu":
                self._check_same_block(nbytes, path)
            _all_gather_into(gathered, own, group=self.group)
        except RuntimeError as err:
            raise RuntimeError(
                f"the all-gather of {path} across the ranks of this host failed: another rank stopped or the ranks "
                f"diverged (sharded streaming needs every rank to run the same steps). {str(err)[:300]}"
            ) from err

    def agree(self, value):
        """The first rank's ``value`` on every rank of the group (collective): ranks that stream in lockstep must
        make the same choices, e.g. the same plan from the same measurements."""
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def _check_same_block(self, nbytes: int, path: str) -> None:
        # Collectives pair up by order, not content: ranks that diverged would swap chunks of different
        # blocks. Where reading the check costs no device synchronisation (the CPU), every load checks it.
        mine = torch.tensor([nbytes, zlib.crc32(path.encode())])
        theirs = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(theirs, mine, group=self.group)
        if any(not torch.equal(t, mine) for t in theirs):
            raise RuntimeError(f"the ranks diverged: this rank loads {path}, another rank a different block")
