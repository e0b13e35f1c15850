"""What the lossless code (``offload_map.runtime.codec``) would buy a streamed block, measured on one machine.

For a block of bf16 (or ``--dtype float16``) weights (N(0, 0.02), as trained weights are distributed; the size of a
Flux-12B double block by default) it measures in the same run: the raw pinned host-to-device copy (today's baseline), the copy of the coded
planes, the decode on the device into a slot, and the encode on the host. It prints one JSON line per size and
appends it to ``--out``. On a machine without CUDA the copies are skipped and decode runs on the CPU.

Usage::

    python benchmarks/codec_throughput.py --out benchmarks/results/<device>/codec_throughput.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from offload_map.runtime import codec, codec_kernel  # noqa: E402
from offload_map.runtime.codec import Coded, decode, encode  # noqa: E402
from offload_map.runtime.coded_host import CodedHost  # noqa: E402
from offload_map.runtime.slots import Staging  # noqa: E402
from offload_map.runtime.streams import CudaOrdering  # noqa: E402

FLUX_DOUBLE_BLOCK = 339_831_296  # bytes of one Flux-12B double block in bf16


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, timed by CUDA events on the device (wall clock on the CPU)."""
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return sorted(times[1:])[len(times[1:]) // 2]


def measure(
    nbytes: int, device: torch.device, repeats: int, dtype: torch.dtype = torch.bfloat16, warps: tuple[int, ...] = ()
) -> dict:
    weights = torch.randn(nbytes // 2, generator=torch.Generator().manual_seed(0)).mul(0.02).to(dtype)
    raw = weights.view(torch.uint8)
    began = time.perf_counter()
    coded = encode(raw)
    encode_s = time.perf_counter() - began
    row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "block_bytes": nbytes}
    row["dtype"] = str(dtype).removeprefix("torch.")
    row.update(
        coded_bytes=coded.nbytes,
        ratio=round(coded.ratio, 4),
        bits=coded.bits,
        raw_bits=coded.raw_bits,
        escapes=coded.escapes.numel(),
    )
    row["encode_GBps"] = round(nbytes / encode_s / 1e9, 3)
    slot = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if device.type == "cuda":
        pinned = raw.pin_memory()
        planes = [t.pin_memory() for t in coded.planes]
        staged = [torch.empty_like(t, device=device) for t in planes]
        raw_s = _timed(lambda: slot.copy_(pinned, non_blocking=True), device, repeats)
        coded_s = _timed(lambda: [d.copy_(h, non_blocking=True) for d, h in zip(staged, planes)], device, repeats)
        row.update(raw_copy_s=raw_s, raw_copy_GBps=round(nbytes / raw_s / 1e9, 2), coded_copy_s=coded_s)
        on_device = Coded(*staged, raw_bits=coded.raw_bits)
    else:
        on_device = coded
    decode_s = _timed(lambda: decode(on_device, out=slot), device, repeats)
    row.update(
        decode_s=decode_s,
        decode_output_GBps=round(nbytes / decode_s / 1e9, 1),
        kernel=codec.expand is not None and device.type == "cuda",
    )
    row["bit_exact"] = bool(torch.equal(slot.cpu(), raw))
    if row["kernel"] and warps:  # the kernel's output rate at each count of warps a program runs in
        shipped, by_warps = codec_kernel.WARPS, {}
        try:
            for count in warps:
                codec_kernel.WARPS = count
                slot.zero_()
                seconds = _timed(lambda: decode(on_device, out=slot), device, repeats)
                by_warps[count] = round(nbytes / seconds / 1e9, 1) if torch.equal(slot.cpu(), raw) else "wrong"
        finally:
            codec_kernel.WARPS = shipped
        row["decode_output_GBps_by_warps"] = by_warps
    if device.type == "cuda":
        row["coded_copy_plus_decode_vs_raw_copy"] = round((row["coded_copy_s"] + decode_s) / row["raw_copy_s"], 3)
        kernel, codec.expand = codec.expand, None  # the torch fallback, for comparison
        torch_s = _timed(lambda: decode(on_device, out=slot), device, repeats)
        codec.expand = kernel
        row.update(torch_decode_s=torch_s, torch_decode_output_GBps=round(nbytes / torch_s / 1e9, 1))
        # The runtime's path: piece by piece through two staging buffers, copies on the copy stream, decodes on
        # the decode stream, timed from the current stream (which waits for both).
        began = time.perf_counter()
        host = CodedHost(pinned, device, pin=True)  # as dispatch codes a block: on the device
        row["device_encode_GBps"] = round(nbytes / (time.perf_counter() - began) / 1e9, 2)
        ordering = CudaOrdering(device)
        staging = Staging(host.staging_bytes(), ordering)
        done = ordering.event()

        def runtime_copy() -> None:
            ordering.copy_stream.wait_stream(torch.cuda.current_stream(device))
            with ordering.on_copy_stream():
                host.copy(slot, 0, nbytes, staging)
            ordering.record_decode(done)
            torch.cuda.current_stream(device).wait_event(done)

        slot.zero_()
        piece_s = _timed(runtime_copy, device, repeats)
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        runtime_copy()  # the host's share: issuing copies, waits and decodes (the device runs behind)
        row["runtime_host_issue_us"] = round((time.perf_counter() - began) * 1e6, 1)
        torch.cuda.synchronize(device)
        row.update(runtime_copy_decode_s=piece_s, runtime_vs_raw_copy=round(piece_s / raw_s, 3))
        row["runtime_bit_exact"] = bool(torch.equal(slot.cpu(), raw))
        host.release()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bytes", type=int, nargs="+", default=[FLUX_DOUBLE_BLOCK], help="block sizes in bytes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="append the JSON lines to this file")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument(
        "--warps", type=int, nargs="*", default=(), choices=(1, 2, 4, 8, 16, 32), help="also time the kernel at these warps"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for nbytes in args.bytes:
        row = measure(nbytes - nbytes % 512, device, args.repeats, getattr(torch, args.dtype), tuple(args.warps))
        print(json.dumps(row))
        if args.out:
            with open(args.out, "a") as out:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
