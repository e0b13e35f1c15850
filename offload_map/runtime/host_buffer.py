"""Host buffers: a unit's tensors packed into one flat, optionally page-locked, host buffer.

Each tensor gets an aligned region holding its exact memory layout (strides kept, dtypes mixed), so a unit
moves in one copy and its tensors are views of wherever the bytes are (this buffer, a device buffer, a slot).

Ownership (``HostBuffer``):

- ``flat``: allocated here, or a slice of the region this host's ranks share (``shared_host.HostCopy`` owns
  that mapping). Page-locked by ``pin`` with ``cudaHostRegister`` at its exact size (torch's pinned
  allocator rounds each allocation up to a power of two); unregistered by ``release``, or when the
  ``HostBuffer`` is garbage collected (after ``detach``, the memory lives on, pageable, in the views).
- Reads: device copies out of the buffer are issued by its unit (``runtime.unit``), on the copy stream only
  (``streams.CudaOrdering``): the copy stream is the one stream that reads host buffers.
- Writes after packing (``write``, at refresh) and ``release`` happen only after the host waited for the
  copy stream (``ordering.wait_copies()``, the caller's duty), so a copy in flight never reads a
  half-written, unregistered or freed buffer.

This file binds no module tensor: the unit owning the buffer does.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from dataclasses import dataclass

import torch

from ..planning.bind import direct_child

logger = logging.getLogger("offload_map")

# Tensor regions start on the caching allocator's own alignment, so kernels see the same alignment for
# a view into a slot as for a resident tensor (and choose the same code paths: outputs stay bit-exact).
ALIGN = 512


@dataclass(frozen=True)
class Region:
    """Where one tensor lives inside a flat buffer."""

    offset: int
    span: int  # bytes from the first to one past the last element, strides included
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype

    def raw(self, flat: torch.Tensor, base: int = 0) -> torch.Tensor:
        """The region's elements as stored: 1-D, every element of the tensor's memory span once. ``flat`` holds
        the layout's bytes from ``base`` on."""
        return flat[self.offset - base : self.offset - base + self.span].view(self.dtype)

    def view(self, flat: torch.Tensor, base: int = 0) -> torch.Tensor:
        return self.raw(flat, base).as_strided(self.shape, self.stride)


def storage_span(t: torch.Tensor) -> torch.Tensor:
    """The tensor's memory from its first to its last element, as stored: copying this (not the tensor element
    by element) keeps any layout, including broadcast (stride-0) tensors that overlap themselves."""
    return t.as_strided((_span_elements(t),), (1,), t.storage_offset())


def _span_elements(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def layout(tensors: list[torch.Tensor]) -> tuple[list[Region], int]:
    """Aligned regions for ``tensors`` (metadata only: meta tensors will do) in one flat buffer, and its size.

    Example:
        >>> regions, size = layout([torch.empty(3), torch.empty(2, 2).t()])
        >>> [(r.offset, r.span, r.stride) for r in regions], size
        ([(0, 12, (1,)), (512, 16, (1, 2))], 1024)
    """
    regions, offset = [], 0
    for t in tensors:
        span = _span_elements(t) * t.element_size()
        regions.append(Region(offset, span, t.shape, tuple(t.stride()), t.dtype))
        offset += -(-span // ALIGN) * ALIGN
    return regions, offset


def split_points(qualnames: list[str], regions: list[Region], path: str) -> tuple[int, ...]:
    """Byte offsets where the layout (``regions`` of the tensors ``qualnames``) of block ``path`` can be cut so that
    everything before the cut is whole direct submodules of the block: the part a plan may keep on the device
    while the rest streams. Tensors come grouped by submodule, the block's own last (``planning.bind.block_order``)."""
    children = [direct_child(qualname, path) for qualname in qualnames]
    last = {child: i for i, child in enumerate(children)}
    points, reach = [], -1
    for i, child in enumerate(children[:-1]):
        if child is None:  # the block's own tensors come last: no cut past them
            break
        reach = max(reach, last[child])
        if reach == i:  # every submodule begun so far ends here
            points.append(regions[i + 1].offset)
    # Zero-size tensors add no bytes: their cuts repeat a cut, or fall at the start or the end.
    end = regions[-1].offset + regions[-1].span if regions else 0
    return tuple(sorted({p for p in points if 0 < p < end}))


class HostLayout:
    """Where a unit's tensors sit in its flat layout (``layout``): what a slot, a head or a host buffer holding the
    unit's bytes is cut into. ``HostBuffer`` holds the bytes themselves; ``mapped_host.MappedHost`` only the layout."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.regions, self.nbytes = layout(tensors)

    def views(self, flat: torch.Tensor, start: int = 0, stop: int | None = None) -> list[torch.Tensor]:
        """Views of the tensors stored in bytes ``start:stop`` of the layout (both at tensor boundaries, e.g. from
        ``split_points``), in a buffer ``flat`` that holds those bytes from its own offset 0."""
        # No default upper bound: a trailing zero-size tensor sits at offset == nbytes and needs a view too.
        return [r.view(flat, start) for r in self.regions if start <= r.offset and (stop is None or r.offset < stop)]

    def first_at(self, offset: int) -> int:
        """Index of the first tensor stored at or after byte ``offset``."""
        return sum(region.offset < offset for region in self.regions)

    def check(self, index: int, tensor: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``tensor`` has tensor ``index``'s shape, strides and dtype."""
        region = self.regions[index]
        if (tensor.shape, tuple(tensor.stride()), tensor.dtype) != (region.shape, region.stride, region.dtype):
            raise ValueError(f"changed from {tuple(region.shape)} {region.dtype} to {tuple(tensor.shape)} {tensor.dtype}")


class HostBuffer(HostLayout):
    """The bytes of one unit's tensors in one flat host buffer (see the module docstring for ownership).

    Args:
        tensors: the unit's tensors, for their layout only (shapes, strides, dtypes; meta tensors will do).
        flat: a host region of at least the layout's size to use (a slice of a region shared between ranks);
            default: a buffer of its own.

    Example:
        >>> buffer = HostBuffer([torch.arange(3.0)])
        >>> buffer.write(0, torch.arange(3.0))
        >>> buffer.view(0), buffer.nbytes
        (tensor([0., 1., 2.]), 512)
    """

    def __init__(self, tensors: list[torch.Tensor], flat: torch.Tensor | None = None) -> None:
        super().__init__(tensors)
        self.flat = torch.empty(self.nbytes, dtype=torch.uint8) if flat is None else flat[: self.nbytes]
        if flat is None:  # the gaps between tensors are copied too: zeros, not whatever the heap held
            for region, end in zip(self.regions, [r.offset for r in self.regions[1:]] + [self.nbytes]):
                self.flat[region.offset + region.span : end].zero_()
        self.owned = flat is None
        self.pinned = False
        self._registration = None

    @classmethod
    def holding(cls, tensors: list[torch.Tensor], pin: bool) -> "HostBuffer":
        """A buffer of its own holding copies of ``tensors`` (on any device), page-locked first when ``pin`` (so
        tensors on the device come back at page-locked speed)."""
        buffer = cls(tensors)
        if pin:
            # Written first: registering faults untouched pages in one by one, several times slower than torch
            # writing them (an H200 host: 137 ms to register 330 MB of fresh pages, 21 ms for 440 MB written before).
            buffer.flat.zero_()
            buffer.pin()
        for index, tensor in enumerate(tensors):
            buffer.write(index, tensor)
        return buffer

    def view(self, index: int) -> torch.Tensor:
        """Tensor ``index`` as stored in this buffer."""
        return self.regions[index].view(self.flat)

    def at_rest(self) -> list[torch.Tensor]:
        """What the unit's tensors view between uses: this buffer."""
        return self.views(self.flat)

    def raw(self, index: int) -> torch.Tensor:
        """Tensor ``index``'s memory span as stored (``Region.raw``)."""
        return self.regions[index].raw(self.flat)

    def packed(self) -> torch.Tensor:
        """The unit's bytes in its layout: this buffer."""
        return self.flat

    def write(self, index: int, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (same shape, strides and dtype) as tensor ``index``. The caller has waited for the copy stream.

        Raises:
            ValueError: ``tensor``'s shape, strides or dtype differ from the layout's.
        """
        self.check(index, tensor)
        self.regions[index].raw(self.flat).copy_(storage_span(tensor.detach()))

    def holds(self, index: int, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is this buffer's own view of tensor ``index``."""
        return tensor.device.type == "cpu" and tensor.data_ptr() == self.flat.data_ptr() + self.regions[index].offset

    def pin(self) -> None:
        """Page-lock the buffer for asynchronous copies (CUDA only); a buffer of its own falls back to torch's
        pinned allocator, a shared slice stays pageable, both with a warning."""
        if not self.nbytes or not torch.cuda.is_available():
            return
        err = torch.cuda.cudart().cudaHostRegister(self.flat.data_ptr(), self.nbytes, 0)
        if int(err) == 0:
            self.pinned = True
            self._registration = weakref.finalize(self, _unregister, self.flat.data_ptr())
            return
        logger.warning(
            "cudaHostRegister of %d bytes failed (error %s)%s",
            self.nbytes,
            int(err),
            "; using torch's pinned allocator" if self.owned else "; this buffer stays pageable",
        )
        if self.owned:
            self.flat = self.flat.pin_memory()
            self.pinned = True

    def release(self) -> None:
        """Unregister the page lock and let go of the buffer; the caller has waited for the copy stream. Safe to
        call twice."""
        if self._registration is not None:
            self._registration()
        self.pinned = False
        self.flat = torch.empty(0, dtype=torch.uint8)


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def home_device(device: torch.device, loaded: bool) -> torch.device:
    """Where a tensor goes back to on restore: its original device, except that a tensor read from a checkpoint
    (originally on the meta device) stays usable on the CPU once the dispatch had loaded it."""
    return torch.device("cpu") if device.type == "meta" and loaded else device


def trim_host_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps small freed tensors' pages, inflating RSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
