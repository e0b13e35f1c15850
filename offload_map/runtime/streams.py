"""The ordering primitives of the runtime: one copy stream and events, or their synchronous CPU stand-ins.

``CudaOrdering`` owns the one dedicated copy stream of a dispatch. Every host-to-device weight copy is issued
on it (block loads into slots, kept block parts, pinned components), so it is the only stream that reads
host buffers. With ``compression`` it also owns a decode stream (high priority, created on first use): coded
pieces copied into a staging buffer are decoded there into their slot, so the copy stream goes on copying the
next piece meanwhile; such a load's ``ready`` event is recorded on the decode stream after its last decode.
The compute stream is whatever stream is current when a module runs (a user's own stream included). Work is
ordered across streams with events only (``record`` / ``wait_event``); the host waits (``wait_copies``,
``synchronize``) only outside the steady state: refresh, re-plan, restore.

``SyncOrdering`` runs the same runtime code on the CPU: copies happen at once and events are no-ops, so
CI exercises the runtime's bookkeeping (a wrong slot shows up as wrong numbers) without a GPU.
"""

from __future__ import annotations

import contextlib
import time

import torch

# The decode stream's priority (lower is higher; torch clamps it to the device's range): a block waits for its
# decode, and the decode's kernels are short, so they go first when the compute stream's kernels leave room.
DECODE_PRIORITY = -1


class CudaOrdering:
    """The copy stream (owned here, created once per dispatch) and event helpers for ``device``."""

    asynchronous = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Orders every host-to-device weight copy of this dispatch, one after another, so the link stays busy.
        self.copy_stream = torch.cuda.Stream(device)
        self._decode_stream: torch.cuda.Stream | None = None

    @property
    def decode_stream(self) -> torch.cuda.Stream:
        # High priority: a decode is short, and a block waits for it.
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device, priority=DECODE_PRIORITY)
        return self._decode_stream

    def compute_stream(self) -> torch.cuda.Stream:
        """The stream modules run on now: the current stream of the device."""
        return torch.cuda.current_stream(self.device)

    def event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def on_copy_stream(self):
        return torch.cuda.stream(self.copy_stream)

    def on_decode_stream(self):
        return torch.cuda.stream(self.decode_stream)

    def record_copy(self, event: torch.cuda.Event) -> None:
        event.record(self.copy_stream)

    def record_decode(self, event: torch.cuda.Event) -> None:
        event.record(self.decode_stream)

    def decode_waits(self, event: torch.cuda.Event) -> None:
        self.decode_stream.wait_event(event)

    def record_compute(self, event: torch.cuda.Event) -> None:
        event.record(self.compute_stream())

    def copy_waits(self, event: torch.cuda.Event) -> None:
        self.copy_stream.wait_event(event)

    def compute_waits(self, event: torch.cuda.Event) -> None:
        self.compute_stream().wait_event(event)

    def stream_waits(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        stream.wait_event(event)

    def wait_copies(self) -> None:
        """The host waits for every copy (and decode) issued so far (before host buffers are written or released)."""
        self.copy_stream.synchronize()
        if self._decode_stream is not None:
            self._decode_stream.synchronize()

    def synchronize(self) -> None:
        """The host waits for all work on the device, on every stream (before ``restore`` frees anything that a
        user's stream may still read)."""
        torch.cuda.synchronize(self.device)

    def stamp(self) -> torch.cuda.Event:
        """A timing mark on the current stream: compute, or the copy stream inside ``on_copy_stream`` (calibration only)."""
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        """Device time between two marks; the caller synchronised on the last mark."""
        return start.elapsed_time(end) / 1e3

    def wait_for(self, stamp: torch.cuda.Event) -> None:
        stamp.synchronize()


class SyncOrdering:
    """Synchronous stand-in for ``CudaOrdering`` (CPU target): same calls, nothing to order."""

    asynchronous = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def compute_stream(self) -> None:
        return None

    def event(self) -> None:
        return None

    def on_copy_stream(self):
        return contextlib.nullcontext()

    on_decode_stream = on_copy_stream

    def record_copy(self, event: None) -> None:
        pass

    record_decode = decode_waits = record_copy

    def record_compute(self, event: None) -> None:
        pass

    def copy_waits(self, event: None) -> None:
        pass

    def compute_waits(self, event: None) -> None:
        pass

    def stream_waits(self, stream: None, event: None) -> None:
        pass

    def wait_copies(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def stamp(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def wait_for(self, stamp: float) -> None:
        pass


def ordering_for(device: torch.device) -> "CudaOrdering | SyncOrdering":
    """The ordering for a target device: streams and events on CUDA, synchronous elsewhere."""
    return CudaOrdering(device) if device.type == "cuda" else SyncOrdering(device)
