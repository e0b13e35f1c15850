"""Where a coded step's time goes: one model, one process, ``layerwise`` window 2 under variants of the coded path.

Rows, each against the same resident reference: ``raw`` (no compression), ``lossless`` (as shipped), ``no-decode``
(the coded copies alone, decodes skipped: the output is wrong, the time is the link's share), and variants of the
runtime's constants (``STAGING_BUFFERS``, ``PIECE``, ``DECODE_PRIORITY``) set for one row. Per row: median step of
``--repeats`` forwards run back to back (device events), peak GPU memory, bit-exactness. A diagnostic for choosing
those constants, not a comparison with peers (``step_time.py`` is).

Usage (GPU)::

    python benchmarks/lossless_variants.py --model sd35-medium --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from offload_map import dispatch_pipeline  # noqa: E402
from offload_map.runtime import codec, coded_host, ring, slots, streams  # noqa: E402

import step_time  # noqa: E402

VARIANTS = {
    "raw": {},
    "lossless": {},
    "no-decode": {"expand": True},
    "staging-4": {"STAGING_BUFFERS": 4},
    "staging-4-piece-32MiB": {"STAGING_BUFFERS": 4, "PIECE": 32 << 20},
    "priority-highest": {"DECODE_PRIORITY": -100},
    "staging-4-piece-32MiB-highest": {"STAGING_BUFFERS": 4, "PIECE": 32 << 20, "DECODE_PRIORITY": -100},
}


@contextlib.contextmanager
def variant(settings: dict):
    saved = []

    def put(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    for name, value in settings.items():
        if name == "expand":
            put(codec, "expand", lambda coded, out: None)
        elif name == "STAGING_BUFFERS":
            put(slots, name, value)
            put(ring, name, value)
        elif name == "PIECE":
            put(coded_host, name, value)
        else:
            put(streams, name, value)
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def step_seconds(model, inputs: dict, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        for _ in range(2):
            out = model(**inputs, return_dict=False)[0]
        marks = []
        for _ in range(repeats):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)
            out = model(**inputs, return_dict=False)[0]
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        marks.append(end)
        torch.cuda.synchronize()
    steps = sorted(a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:]))
    return steps[len(steps) // 2], out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd35-medium")
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ctx = step_time.make_ctx(step_time.parse_args(["--model", args.model, "--out", args.out]))
    model = step_time.build_model(ctx)
    inputs = step_time.models.make_inputs(ctx.spec, model, ctx.device, 1)
    with torch.inference_mode():
        reference = model.to(ctx.device)(**inputs, return_dict=False)[0].cpu()
    model.to("cpu")
    torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"lossless_variants_{args.model}.jsonl")
    for name in args.variants.split(","):
        with variant(VARIANTS[name]):
            torch.cuda.reset_peak_memory_stats()
            began = time.perf_counter()
            options = {} if name == "raw" else {"compression": "lossless"}
            handle = dispatch_pipeline(model, "layerwise", ctx.device, window=2, progress=False, **options)
            setup_s = time.perf_counter() - began
            step, out = step_seconds(model, inputs, args.repeats)
            report = handle.report()
            coded = report.coded
            handle.remove()
        row = {
            "model": args.model,
            "device": torch.cuda.get_device_name(),
            "variant": name,
            "settings": {k: v for k, v in VARIANTS[name].items() if k != "expand"},
            "step_s": round(step, 4),
            "setup_s": round(setup_s, 2),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
            "bit_exact": bool(torch.equal(out.cpu(), reference)),
            "coded_ratio": None if coded is None else round(coded.coded_bytes / coded.raw_bytes, 4),
            "setup_breakdown": str(report.setup_times),
        }
        print(json.dumps(row), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
