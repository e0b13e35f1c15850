"""Tensors that view a file through a private mapping, and letting their unwritten pages leave the process.

diffusers' and transformers' ``from_pretrained`` leave a model's weights as views of its safetensors files,
mapped private (copy-on-write): a page counts in the process's memory once read, and a written page becomes a
private copy the file does not hold. ``FileViews`` finds such tensors (Linux: ``/proc/self/maps``), so that a
block held only as its code can keep them at rest (``mapped_host``) instead of a raw copy, and
``release_read_pages`` lets the pages that coding read leave the process again, without evicting them from the
page cache (``madvise(MADV_DONTNEED)``, which on a private file mapping would also discard written pages: those
are found in ``/proc/self/pagemap`` and kept).

Ownership: nothing is allocated here; the mappings belong to whoever made them (the tensors' storages).
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import mmap

import torch

from .host_buffer import storage_span

MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
_SWAPPED, _FILE = 1 << 62, 1 << 61  # /proc/self/pagemap entry bits (bit 63, present, is the int64's sign)


class FileViews:
    """The private file mappings of this process when made (``/proc/self/maps``; none where it cannot be read)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    # address perms offset dev inode path: private ("p") and writable ("w", or writing a weight
                    # at refresh would fault), backed by a file ("/...")
                    perms = fields[1] if len(fields) == 6 else ""
                    if perms[1:2] == "w" and perms.endswith("p") and fields[5].startswith("/"):
                        start, end = (int(x, 16) for x in fields[0].split("-"))
                        self._starts.append(start)
                        self._ends.append(end)
        except OSError:
            pass

    def viewed(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` (a CPU tensor) lies wholly inside one private file mapping."""
        if tensor.device.type != "cpu" or not tensor.numel():
            return False
        first = tensor.data_ptr()
        last = first + _span_bytes(tensor)
        index = bisect.bisect_right(self._starts, first) - 1
        return index >= 0 and last <= self._ends[index]


def release_read_pages(tensors: list[torch.Tensor]) -> None:
    """Let the pages holding ``tensors`` (views of private file mappings) that were only read leave this process;
    they stay in the page cache and come back from it when read again. Written pages (private copies) are kept.
    Where ``/proc/self/pagemap`` or ``madvise`` is missing, or pagemap does not tell private pages apart, every page
    stays (as reclaimable file pages). No other thread may write these tensors meanwhile: a page written between
    reading its pagemap entry and the advice would lose the write."""
    libc = _libc()
    if libc is None or not _pagemap_tells_private_pages():
        return
    for first, last in _page_ranges(tensors):
        entries = _pagemap(first, last)
        if entries is None:
            return
        own = ((entries & _SWAPPED) != 0) | ((entries < 0) & ((entries & _FILE) == 0))  # bit 63 (present): the sign
        # Runs of pages holding nothing of their own: where ``own`` turns false, and where it turns true again.
        edge = torch.ones(1, dtype=torch.int8)
        edges = torch.diff(own.to(torch.int8), prepend=edge, append=edge)
        starts, stops = (edges == -1).nonzero().flatten().tolist(), (edges == 1).nonzero().flatten().tolist()
        for a, b in zip(starts, stops):
            libc.madvise(ctypes.c_void_p((first + a) * _PAGE), ctypes.c_size_t((b - a) * _PAGE), MADV_DONTNEED)


def _page_ranges(tensors: list[torch.Tensor]) -> list[list[int]]:
    # The pages the tensors span, as few ranges as possible (neighbouring tensors share pages).
    spans = sorted((t.data_ptr() // _PAGE, -(-(t.data_ptr() + _span_bytes(t)) // _PAGE)) for t in tensors if t.numel())
    ranges: list[list[int]] = []
    for first, last in spans:
        if ranges and first <= ranges[-1][1]:
            ranges[-1][1] = max(ranges[-1][1], last)
        else:
            ranges.append([first, last])
    return ranges


def _pagemap(first: int, last: int) -> torch.Tensor | None:
    """The pagemap entries of pages ``first:last`` (int64), or None where they cannot be read."""
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first * 8)
            data = pagemap.read(8 * (last - first))
    except OSError:
        return None
    if len(data) != 8 * (last - first):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.int64)


@functools.cache
def _pagemap_tells_private_pages() -> bool:
    # A page of our own must read as present and not a file page, or pagemap (emulated, sandboxed) cannot tell which
    # pages hold writes, and releasing would discard them.
    page = mmap.mmap(-1, _PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    page[0] = 1
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    entries = _pagemap(address // _PAGE, address // _PAGE + 1)
    return entries is not None and bool(entries[0] < 0) and not bool(entries[0] & _FILE)


def _span_bytes(tensor: torch.Tensor) -> int:
    return storage_span(tensor).numel() * tensor.element_size()


def _libc():
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None
