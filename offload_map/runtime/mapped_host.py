"""A coded block held in host memory only as its code: at rest, its tensors view their checkpoint file (or a file
of the offload folder).

With ``compression="lossless"`` a streamed block streams its code (``coded_host``); its raw bytes are needed
only to restore it, to code it anew at ``refresh()``, or to stream it raw again. A block whose tensors view a
file does not keep them (its other tensors, a LoRA's say, get memory of their own): one read from a safetensors
checkpoint (``weights=``) that stores it as the model lays it out (same dtypes, contiguous tensors), through a
private mapping of its own (``loading.checkpoint.Checkpoint.mapped``), or one whose weights ``from_pretrained``
left as views of their files (``file_views``). A block built in memory has no such file: with
``offload_folder`` its raw bytes are written to one there (``written``), whose name goes at once (its mapping keeps
it until the unit lets go; nothing is left behind). Once it is coded, its raw host buffer goes, and between uses its
tensors view the file. Host memory then holds about 0.71 of the block's bytes instead of 1.71 times them. Reading
such a tensor reads the file; writing one (``fuse_lora``, ``load_state_dict``) writes private copies of the pages
it touches, never the file, and ``refresh()`` codes the block anew as after any edit.

Ownership (``MappedHost``, one per such unit, owned by its ``OffloadedUnit``): ``mapped`` are the views, which
keep the file's mapping alive; nothing here is page-locked and no copy stream reads it (the unit copies its
code). ``packed`` builds a temporary buffer of the unit's bytes for its caller (coding at refresh);
``to_buffer`` gives the unit a ``HostBuffer`` again when it must stream raw.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..loading.checkpoint import map_private
from .file_views import release_read_pages
from .host_buffer import HostBuffer, HostLayout, storage_span


class MappedHost(HostLayout):
    """The layout of a unit whose tensors ``mapped`` (contiguous, in the unit's order) view its checkpoint.

    Args:
        mapped: copy-on-write views of the checkpoint, one per tensor of the unit.
        pin: whether the raw buffer it replaces was page-locked (``to_buffer`` page-locks likewise).
        lent: per tensor, whether it was this view before dispatch (``from_pretrained``'s): restoring gives it
            back; the others (read by ``weights=``, or memory of its own) get a copy, so that nothing the user did
            not map before stays tied to a file that may be written over.
    """

    pinned = False  # nothing is copied from here to a device

    def __init__(self, mapped: list[torch.Tensor], pin: bool, lent: list[bool]) -> None:
        super().__init__(mapped)
        self.mapped = mapped
        self.pin = pin
        self.lent = lent

    @classmethod
    def written(cls, buffer: HostBuffer, folder: Path) -> "MappedHost":
        """A ``MappedHost`` whose tensors view a new file of ``folder`` holding ``buffer``'s bytes (``offload_folder``).
        The file's name goes before a byte is written (a process killed while writing leaves nothing), and its
        descriptor once it is mapped (a mapping holds none: a dispatch of many blocks stays within the limit on
        open files).

        Raises:
            OSError: the file cannot be written or mapped (a full disk, a folder gone, a mapping refused).
        """
        handle, name = tempfile.mkstemp(prefix="offload_map-", suffix=".bin", dir=folder)
        try:
            os.unlink(name)
            with os.fdopen(handle, "wb", closefd=False) as file:
                file.write(buffer.flat.numpy().data)
            whole = map_private(f"/proc/self/fd/{handle}", buffer.nbytes)  # the mapping outlives the descriptor
        finally:
            os.close(handle)
        return cls(buffer.views(whole), buffer.pinned, [False] * len(buffer.regions))

    def at_rest(self) -> list[torch.Tensor]:
        """What the unit's tensors view between uses: the checkpoint."""
        return list(self.mapped)

    def raw(self, index: int) -> torch.Tensor:
        """Tensor ``index``'s memory span as stored (``host_buffer.storage_span``)."""
        return storage_span(self.mapped[index])

    def packed(self) -> torch.Tensor:
        """A new buffer of the unit's bytes in its layout (zeros between tensors, as in a ``HostBuffer``)."""
        flat = torch.zeros(self.nbytes, dtype=torch.uint8)
        for index, region in enumerate(self.regions):
            region.raw(flat).copy_(self.raw(index))
        release_read_pages(self.mapped)  # or a refresh would leave the whole file counted in this process's memory
        return flat

    def holds(self, index: int, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is the view of tensor ``index`` this unit made."""
        return tensor.device.type == "cpu" and tensor.data_ptr() == self.mapped[index].data_ptr()

    def write(self, index: int, tensor: torch.Tensor) -> None:
        """Store ``tensor`` as tensor ``index`` (in private pages, not the file). Equal bytes are not written: a
        written page is private memory for as long as the mapping lives (a kept part copied back at every refresh
        would fill them).

        Raises:
            ValueError: ``tensor``'s shape, strides or dtype differ from the layout's.
        """
        self.check(index, tensor)
        tensor = tensor.detach()
        mapped = self.mapped[index]
        if not torch.equal(mapped.reshape(-1).view(torch.uint8), tensor.cpu().reshape(-1).view(torch.uint8)):
            mapped.copy_(tensor)

    def to_buffer(self) -> HostBuffer:
        """A host buffer of its own holding the unit's current bytes, for a unit that streams raw from now on."""
        return HostBuffer.holding(self.mapped, self.pin)

    def release(self) -> None:
        """Let go of the views (the mapping goes with the last view of it). Safe to call twice."""
        self.mapped = []
