"""Measured copy/compute timeline of one step under ``strategy="auto"`` (beside the planner's prediction) or
``"layerwise"``.

Usage (GPU)::

    python benchmarks/timeline.py --model flux-12b --budgets 8GiB,12GiB,16GiB,w2 --out DIR

``wN`` in ``--budgets`` is ``strategy="layerwise"`` with window N (no budget, no prediction). ``--compression``
dispatches every budget with it: a coded load's copy counts its code's bytes and ends at its last decode.
For each budget: dispatch, run the calibration and re-plan, time ``--repeats`` steps the way
``step_time.py`` does (device synchronised around each), then record one more step with CUDA timing
events around every block and copy. Each link gap (copy stream idle between two copies) is split into
"host late" (the copy was issued after the previous one had finished) and "slot wait" (the copy waited
for the block using its slot); each compute gap into "host late" and "copy wait". Also measures copies
of one block beside a matrix-multiply loop, against the same copies alone, to tell a slower link under
compute from scheduling. ``--back-to-back N`` then records N more steps unsynchronised, as a denoising loop runs
them, from one synchronised origin: per step, how far the host ran ahead of the device. Writes ``DIR/timeline_<model>.jsonl`` (one row per budget, with both timelines)
and prints a summary per budget.

This is a diagnostic: it wraps ``Prefetcher.enter``/``exit`` and ``OffloadedUnit.load`` for the recorded steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import offload_map
from offload_map import model_zoo as models
from offload_map.mapping.sizes import parse_size
from offload_map.runtime.prefetcher import Prefetcher
from offload_map.runtime.unit import OffloadedUnit


class Recorder:
    """Timing events (with the host time they were issued) while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.marks: list[tuple[str, int, torch.cuda.Event, float]] = []
        self.copies: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self.copy_blocks: list[int] = []

    def mark(self, kind: str, block: int, stream=None) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream if stream is not None else torch.cuda.current_stream())
        self.marks.append((kind, block, event, time.perf_counter()))


REC = Recorder()
_enter, _exit, _load = Prefetcher.enter, Prefetcher.exit, OffloadedUnit.load


def enter(self, block):
    if REC.active:
        REC.mark("ready_wait", block)
    _enter(self, block)
    if REC.active:
        REC.mark("start", block)


def exit_(self, block):
    if REC.active:
        REC.mark("end", block)
    _exit(self, block)


def load(self, slot, copier, timed=None):
    if REC.active and timed is None and slot.holds is not self:
        REC.mark("issue", self.path, self.ordering.copy_stream)
        REC.copy_blocks.append(self.path)
        before = len(REC.copies)
        moved = _load(self, slot, copier, REC.copies)
        if len(REC.copies) > before:  # the bytes that crossed the link (a coded load's code), so link_GBps is the link's
            _, start, end = REC.copies[-1]
            REC.copies[-1] = (moved, start, end)
        return moved
    return _load(self, slot, copier, timed)


Prefetcher.enter, Prefetcher.exit, OffloadedUnit.load = enter, exit_, load


def record_steps(model, inputs, steps: int = 1) -> list[dict]:
    """``steps`` forwards back to back (no synchronisation between them, as a denoising loop runs them), with marks;
    per step, the measured rows and the gaps' causes (ms). Times are from one synchronised origin, so a step's host
    lead (a block's start on the device less its issue on the host) shows how far the host ran ahead."""
    torch.cuda.synchronize()
    REC.__init__()
    REC.active = True
    for _ in range(steps):
        REC.mark("forward", -1)
        model(**inputs, return_dict=False)
    REC.mark("forward", -1)  # the end of the last step
    REC.active = False
    torch.cuda.synchronize()
    zero_event, zero_host = REC.marks[0][2], REC.marks[0][3]
    marks = [(kind, block, zero_event.elapsed_time(e), (host - zero_host) * 1e3) for kind, block, e, host in REC.marks]
    copies = [
        (block, zero_event.elapsed_time(s), zero_event.elapsed_time(e), n)
        for block, (n, s, e) in zip(REC.copy_blocks, REC.copies)
    ]
    # A copy belongs to the step that issued it (the next step's first loads are issued while this one computes).
    issues = [m for m in marks if m[0] == "issue"]
    starts = [i for i, m in enumerate(marks) if m[0] == "forward"]
    out = []
    for first, last in zip(starts, starts[1:]):
        segment = marks[first : last + 1]
        step_issues = [m for m in segment[:-1] if m[0] == "issue"]
        begin = issues.index(step_issues[0]) if step_issues else 0
        out.append(_analyse(segment, copies[begin : begin + len(step_issues)], step_issues))
    return out


def _analyse(marks: list, copies: list, issues: list) -> dict:
    link = {"host_late_ms": 0.0, "slot_wait_ms": 0.0, "busy_ms": 0.0, "bytes": 0}
    prev_end = None
    for (_block, start, end, n), issue in zip(copies, issues):
        link["busy_ms"] += end - start
        link["bytes"] += n
        if prev_end is not None and start > prev_end:
            late = max(0.0, min(issue[2], start) - prev_end)
            link["host_late_ms"] += late
            link["slot_wait_ms"] += start - prev_end - late
        prev_end = end
    compute = {"host_late_ms": 0.0, "copy_wait_ms": 0.0, "busy_ms": 0.0}
    rows, last_end, pending = [], None, {}
    for kind, block, t, host in marks[:-1]:
        if kind == "ready_wait":
            pending[block] = (t, host)
        elif kind == "start":
            wait_at, host_at = pending.pop(block)
            if last_end is not None:
                late = max(0.0, wait_at - last_end)
                compute["host_late_ms"] += late
                compute["copy_wait_ms"] += max(0.0, t - max(wait_at, last_end))
            rows.append({"block": block, "start_ms": t, "host_ms": host_at})
        elif kind == "end":
            rows[-1]["end_ms"] = t
            compute["busy_ms"] += t - rows[-1]["start_ms"]
            last_end = t
    lead = [r["start_ms"] - r["host_ms"] for r in rows]
    return {
        "step_ms": marks[-1][2] - marks[0][2],
        "host_ms": marks[-1][3] - marks[0][3],  # the host's time to issue the step
        "link": link,
        "compute": compute,
        "link_GBps": link["bytes"] / link["busy_ms"] / 1e6 if link["busy_ms"] else None,
        "host_lead_ms": {"min": min(lead), "median": statistics.median(lead)} if lead else None,
        "rows": rows,
        "copies": copies,
    }


def copies_beside_compute(nbytes: int, device: str, copies: int = 8) -> dict:
    """Bandwidth of ``copies`` pinned copies of ``nbytes`` alone, then beside a matmul loop on another stream."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    stream = torch.cuda.Stream(device)
    out = {}
    for label, busy in (("idle", False), ("beside_matmul", True)):
        torch.cuda.synchronize()
        if busy:
            for _ in range(400):  # ~1 TFLOP each: longer than the copies
                a @ a
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            for _ in range(copies):
                dst.copy_(src, non_blocking=True)
            end.record(stream)
        torch.cuda.synchronize()
        out[label] = nbytes * copies / (start.elapsed_time(end) / 1e3) / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="flux-12b")
    parser.add_argument("--budgets", default="8GiB,12GiB,16GiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=".")
    parser.add_argument(
        "--back-to-back",
        type=int,
        default=0,
        help="also record this many steps back to back, unsynchronised, as a denoising loop runs them",
    )
    parser.add_argument(
        "--compression",
        choices=("lossless", "fp8"),
        help="dispatch with this compression (a coded load's copy ends at its last decode)",
    )
    args = parser.parse_args()
    device = "cuda:0"
    spec = models.resolve_spec(args.model)
    model = models.build_model(spec, 0, 0.02, device)
    inputs = models.make_inputs(spec, model, device, 1)
    stats = models.block_stats(model)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"timeline_{spec.name}.jsonl")
    probe = {size: copies_beside_compute(size, device) for size in (283_000_000, stats["largest_block_bytes"])}
    print("copies alone / beside matmul (GB/s):", json.dumps(probe), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps({"kind": "probe", "device": torch.cuda.get_device_name(), "copies": probe}) + "\n")
    for budget in args.budgets.split(","):
        options = {"compression": args.compression} if args.compression else {}
        if budget.startswith("w"):
            handle = offload_map.dispatch_pipeline(model, strategy="layerwise", device=device, window=int(budget[1:]), **options)
        else:
            handle = offload_map.dispatch_pipeline(
                model, strategy="auto", device=device, gpu_budget=parse_size(budget), **options
            )
        times = []
        with torch.inference_mode():
            for _ in range(3 + args.repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(**inputs, return_dict=False)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                model(**inputs, return_dict=False)
            torch.cuda.synchronize()
            unsynced = (time.perf_counter() - t0) / args.repeats
            (measured,) = record_steps(model, inputs)
            back_to_back = record_steps(model, inputs, args.back_to_back) if args.back_to_back else []
        row = {
            "kind": "budget",
            "budget": budget,
            "compression": args.compression,
            "step_s": statistics.median(times[3:]),
            "unsynced_step_s": unsynced,
            "measured": measured,
            "back_to_back": back_to_back,
        }
        plan = next(iter(handle.plans.values()), None)
        if plan is not None:
            predicted = [
                {"path": p, "streamed": s, "copy": [c0, c1], "compute": [s0, s1]} for p, s, c0, c1, s0, s1 in plan.timeline.rows
            ]
            row.update(
                {
                    "budget_bytes": plan.budget,
                    "predicted_step_s": plan.step_s,
                    "window": plan.window,
                    "streamed_blocks": len(plan.streamed),
                    "bandwidth_Bps": plan.bandwidth,
                    "streamed_bytes": sum(plan.cost.blocks[i].nbytes for i in plan.streamed),
                    "predicted": predicted,
                    "pattern": "".join("S" if i in plan.streamed else "R" for i in range(len(plan.cost.blocks))),
                }
            )
        summary = {k: v for k, v in row.items() if k not in ("measured", "predicted", "back_to_back")}
        summary.update({k: v for k, v in measured.items() if k not in ("rows", "copies")})
        print(json.dumps(summary), flush=True)
        for index, step in enumerate(back_to_back):
            brief = {k: step[k] for k in ("step_ms", "host_ms", "compute", "link_GBps", "host_lead_ms")}
            print(f"back to back, step {index}:", json.dumps(brief), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        handle.remove()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
