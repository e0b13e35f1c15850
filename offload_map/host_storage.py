"""Host storage: a unit's tensors packed into one flat, optionally pinned, host buffer.

``PackedTensors`` owns one flat ``uint8`` host buffer per unit (a streamed block or a pinned component).
Each tensor gets an aligned region holding its exact memory layout (strides kept, dtypes mixed), and the
module's tensors are rebound to views of that region, so the weights exist once on the host: the
original storage is freed as soon as nothing else refers to it.

Ownership: ``PackedTensors`` allocates the buffer and, on CUDA, page-locks it with ``cudaHostRegister``
(exact size: torch's pinned allocator rounds each allocation up to a power of two). The registration is
released by a finalizer when the ``PackedTensors`` goes away, or by ``release()``; the memory itself lives
as long as any view does. Copies out of the buffer are issued by the slot ring or the pinned swapper on
their streams; this file issues none.
"""

from __future__ import annotations

import ctypes
import logging
import time
import weakref
from dataclasses import dataclass

import torch

from .plan import TensorRef, direct_child

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
        return flat[self.offset - base:self.offset - base + self.span].view(self.dtype)

    def view(self, flat: torch.Tensor, base: int = 0) -> torch.Tensor:
        return self.raw(flat, base).as_strided(self.shape, self.stride)


def _storage_span(t: torch.Tensor) -> torch.Tensor:
    # The tensor's memory from its first to its last element, as stored: copying this (not the tensor
    # element by element) keeps any layout, including broadcast (stride-0) buffers that overlap themselves.
    return t.as_strided((_span_elements(t),), (1,), t.storage_offset())


def _span_elements(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def layout(tensors: list[torch.Tensor]) -> tuple[list[Region], int]:
    """Aligned regions for ``tensors`` in one flat buffer, and the buffer's size in bytes."""
    regions, offset = [], 0
    for t in tensors:
        span = _span_elements(t) * t.element_size()
        regions.append(Region(offset, span, t.shape, tuple(t.stride()), t.dtype))
        offset += -(-span // ALIGN) * ALIGN
    return regions, offset


def home_device(device: torch.device, loaded: bool) -> torch.device:
    """Where a tensor goes back to on restore: its original device, except that a tensor read from a checkpoint
    (originally on the meta device) stays usable on the CPU once the dispatch had loaded it."""
    return torch.device("cpu") if device.type == "meta" and loaded else device


def packed_size(refs: list[TensorRef]) -> int:
    """Bytes of the flat buffer ``PackedTensors(refs, ...)`` needs."""
    return layout([r.tensor for r in refs])[1]


def split_points(qualnames: list[str], regions: list[Region], path: str) -> tuple[int, ...]:
    """Byte offsets where the layout (``regions`` of the tensors ``qualnames``) of block ``path`` can be cut so that
    everything before the cut is whole direct submodules of the block: the part a plan may keep on the device
    while the rest streams."""
    children = [direct_child(qualname, path) for qualname in qualnames]
    last = {child: i for i, child in enumerate(children)}
    points, reach = [], -1
    for i, child in enumerate(children[:-1]):
        if child is None:  # the block's own tensors come last (``plan.block_order``): no cut past them
            break
        reach = max(reach, last[child])
        if reach == i:  # every submodule begun so far ends here
            points.append(regions[i + 1].offset)
    # Zero-size tensors add no bytes: their cuts repeat a cut, or fall at the start or the end.
    end = regions[-1].offset + regions[-1].span if regions else 0
    return tuple(sorted({p for p in points if 0 < p < end}))


def _register(buffer: torch.Tensor) -> bool:
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    if int(err) != 0:
        logger.warning("cudaHostRegister of %d bytes failed (error %s); using torch's pinned allocator", buffer.numel(), int(err))
        return False
    return True


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class PackedTensors:
    """The tensors of one unit, packed into one flat host buffer that the module's tensors view.

    Args:
        refs: the tensor slots to pack, in a fixed order.
        pin: page-lock the buffer for asynchronous host-to-device copies (CUDA only).
        flat: a host region of at least ``packed_size(refs)`` bytes to pack into (a slice of a region shared
            between ranks); default: a buffer of its own. A region that cannot be page-locked stays pageable.
        fill: write the weights (``False`` where another rank fills a shared region).
        source: a ``weights.WeightSource`` that reads the meta tensors it covers from their checkpoint.
        bind: point the module's tensors at the buffer now (else ``bind_host()`` later, once it is filled).

    Example:
        >>> from torch import nn
        >>> from offload_map.plan import TensorRef
        >>> lin = nn.Linear(3, 2)
        >>> before = lin.weight.detach().clone()
        >>> packed = PackedTensors([TensorRef(lin, "weight", True, "weight"), TensorRef(lin, "bias", True, "bias")], pin=False)
        >>> torch.equal(lin.weight, before), packed.flat.numel()
        (True, 1024)
    """

    def __init__(self, refs: list[TensorRef], pin: bool, flat: torch.Tensor | None = None, fill: bool = True, source=None,
                 bind: bool = True) -> None:
        self.refs = refs
        self.original_devices = [r.tensor.device for r in refs]
        tensors = [r.tensor.detach() for r in refs]
        self.regions, self.nbytes = layout(tensors)
        owned = flat is None
        start = time.perf_counter()
        self.flat = torch.empty(self.nbytes, dtype=torch.uint8) if owned else flat[:self.nbytes]
        if fill:
            for ref, region, t in zip(refs, self.regions, tensors):
                if source is not None and source.covers(ref):
                    source.read_into(ref, region.view(self.flat))
                else:
                    region.raw(self.flat).copy_(_storage_span(t))
        del tensors
        self.fill_seconds = time.perf_counter() - start  # with pin_seconds: where dispatch time goes
        self.pinned = False
        if pin and torch.cuda.is_available() and self.nbytes:
            if _register(self.flat):
                self.pinned = True
                self._finalizer = weakref.finalize(self, _unregister, self.flat.data_ptr())
            elif owned:
                self.flat = self.flat.pin_memory()
                self.pinned = True
        self.pin_seconds = time.perf_counter() - start - self.fill_seconds
        self.host_views = self.views(self.flat)
        self.bound = False
        if bind:
            self.bind_host()

    def views(self, flat: torch.Tensor, start: int = 0, stop: int | None = None) -> list[torch.Tensor]:
        """Views of the tensors stored in bytes ``start:stop`` of the layout (both at tensor boundaries, e.g. from
        ``split_points``), in a buffer ``flat`` that holds those bytes from its own offset 0."""
        # No default upper bound: a trailing zero-size tensor sits at offset == nbytes and needs a view too.
        return [region.view(flat, start) for region in self.regions if start <= region.offset and (stop is None or region.offset < stop)]

    def first_at(self, offset: int) -> int:
        """Index of the first tensor stored at or after byte ``offset``."""
        return sum(region.offset < offset for region in self.regions)

    def bind(self, views: list[torch.Tensor], first: int = 0) -> None:
        """Point the module's tensors ``first``, ``first + 1``, ... at ``views`` (from ``views()``)."""
        for ref, view in zip(self.refs[first:], views):
            ref.bind(view)

    def split_points(self, path: str) -> tuple[int, ...]:
        """Where block ``path``'s layout can be cut (see the module function ``split_points``)."""
        return split_points([ref.qualname for ref in self.refs], self.regions, path)

    def bind_host(self) -> None:
        """Point the module's tensors back at the host buffer (drops any device copy they referred to)."""
        self.bind(self.host_views)
        self.bound = True

    def sync_from_module(self) -> None:
        """Copy tensors that do not view the host buffer (a device copy, or a replaced tensor) into it.

        Raises:
            ValueError: a tensor's shape, strides or dtype changed since packing (re-dispatch instead).
        """
        for ref, region in zip(self.refs, self.regions):
            tensor = ref.tensor.detach()
            if tensor.device.type == "cpu" and tensor.data_ptr() == self.flat.data_ptr() + region.offset:
                continue  # the host view itself: in-place edits already landed here
            if (tensor.shape, tuple(tensor.stride()), tensor.dtype) != (region.shape, region.stride, region.dtype):
                raise ValueError(
                    f"{ref.qualname} changed from {tuple(region.shape)} {region.dtype} to {tuple(tensor.shape)} "
                    f"{tensor.dtype} since dispatch; remove() and dispatch again to repack it"
                )
            region.raw(self.flat).copy_(_storage_span(tensor))

    def restore(self, loaded: bool = True) -> None:
        """Give every tensor its own storage on its original device again and let go of the buffer.

        Tensors read from a checkpoint (originally on the meta device) go to the CPU when ``loaded``, else
        back to the meta device (a dispatch that failed while loading keeps nothing).
        """
        for ref, region, device in zip(self.refs if self.bound else [], self.regions, self.original_devices):
            raw = region.raw(self.flat)
            fresh = torch.empty(raw.numel(), dtype=raw.dtype, device=home_device(device, loaded))
            fresh.copy_(raw)
            ref.bind(fresh.as_strided(region.shape, region.stride))
        self.release()

    def release(self) -> None:
        """Unregister the page lock now rather than at garbage collection. Safe to call twice."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        self.host_views = []
        self.flat = torch.empty(0, dtype=torch.uint8)


def trim_host_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps small freed tensors' pages, inflating RSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
