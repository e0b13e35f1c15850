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
import mmap
import struct

import torch

from .host_buffer import storage_span

MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61  # /proc/self/pagemap entry bits


class FileViews:
    """The private file mappings of this process when made (``/proc/self/maps``; none where it cannot be read)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    # address perms offset dev inode path: private ("p"), backed by a file ("/...")
                    if len(fields) == 6 and fields[1].endswith("p") and fields[5].startswith("/"):
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
    Where ``/proc/self/pagemap`` or ``madvise`` is missing, every page stays (as reclaimable file pages)."""
    libc = _libc()
    if libc is None:
        return
    for tensor in tensors:
        if not tensor.numel():
            continue
        first = tensor.data_ptr() // _PAGE
        last = -(-(tensor.data_ptr() + _span_bytes(tensor)) // _PAGE)
        try:
            with open("/proc/self/pagemap", "rb") as pagemap:
                pagemap.seek(first * 8)
                entries = struct.unpack(f"<{last - first}Q", pagemap.read(8 * (last - first)))
        except (OSError, struct.error):
            return
        run = None  # first page of the current run of pages that hold nothing of their own
        for page, entry in enumerate([*entries, _PRESENT]):  # a sentinel page ends the last run
            own = entry & _SWAPPED or (entry & _PRESENT and not entry & _FILE)
            if not own and run is None:
                run = page
            elif own and run is not None:
                libc.madvise(ctypes.c_void_p((first + run) * _PAGE), ctypes.c_size_t((page - run) * _PAGE), MADV_DONTNEED)
                run = None


def _span_bytes(tensor: torch.Tensor) -> int:
    return storage_span(tensor).numel() * tensor.element_size()


def _libc():
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None
