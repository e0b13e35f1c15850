"""Soak: many denoising steps under offload; device memory and host RSS must stay flat, the last output
must equal a fresh run's.

Usage (GPU)::

    python benchmarks/soak.py --model sd35-medium --steps 500 --out DIR [--strategies layerwise-w2,auto-2GB]

Usage (no GPU, checks the script itself)::

    python benchmarks/soak.py --model tiny-flux --steps 20 --out DIR --cpu-smoke

Per strategy, in one process: the model built with random bf16 weights, the resident output of the fixed
input as reference, then dispatch and ``--steps`` forwards of that input. Every ``--every`` steps one row:
step, seconds of that step, device memory allocated and reserved, host RSS. The summary row gives the
spread of each after warm-up (the first 10 steps) and whether the last output equals the reference (the
fixed input makes every step's output the same). Writes ``DIR/soak_<model>.jsonl`` and
``DIR/soak_<model>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offload_map import dispatch_pipeline  # noqa: E402
from offload_map import model_zoo as models  # noqa: E402

from step_time import read_status_bytes, trim_host_heap  # noqa: E402

GB = 1e9
WARMUP = 10


def dispatch(model, name: str, device: str):
    if name.startswith("layerwise-w"):
        return dispatch_pipeline(model, "layerwise", device, window=int(name.removeprefix("layerwise-w")))
    if name.startswith("auto-") and name.endswith("GB"):
        return dispatch_pipeline(model, "auto", device, gpu_budget=int(float(name[5:-2]) * 1e9))
    raise ValueError(f"unknown strategy {name!r}: layerwise-wN or auto-<N>GB")


def soak(spec, name: str, steps: int, every: int, device: str, out) -> dict:
    cuda = device != "cpu"
    model = models.build_model(spec, seed=0, gen_device="cuda" if cuda else "cpu").eval()
    inputs = models.make_inputs(spec, model, device, seed=0)
    with torch.inference_mode():
        model.to(device)
        reference = model(**inputs).sample.cpu()
        model.to("cpu")
        handle = dispatch(model, name, device)
        rows, last = [], None
        for step in range(1, steps + 1):
            start = time.perf_counter()
            last = model(**inputs).sample
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if step % every == 0 or step in (1, steps):
                trim_host_heap()
                row = {
                    "strategy": name,
                    "step": step,
                    "step_s": seconds,
                    "rss_gb": read_status_bytes("VmRSS") / GB,
                    "allocated_gb": torch.cuda.memory_allocated() / GB if cuda else None,
                    "reserved_gb": torch.cuda.memory_reserved() / GB if cuda else None,
                }
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                out.flush()
        last = last.cpu()
        handle.remove()
    after = [r for r in rows if r["step"] > WARMUP]

    def spread(key):
        values = [r[key] for r in after if r[key] is not None]
        return (min(values), max(values)) if values else None

    return {
        "strategy": name,
        "summary": True,
        "steps": steps,
        "last_equals_reference": bool(torch.equal(last, reference)),
        "rss_gb_range": spread("rss_gb"),
        "allocated_gb_range": spread("allocated_gb"),
        "reserved_gb_range": spread("reserved_gb"),
        "step_s_range": spread("step_s"),
    }


def table(summaries: list[dict], device: str) -> str:
    def fmt(pair, digits=2):
        return "-" if pair is None else f"{pair[0]:.{digits}f} .. {pair[1]:.{digits}f}"

    lines = [
        f"device: {device}; ranges after the first {WARMUP} steps",
        "",
        "| strategy | steps | host RSS GB | device allocated GB | device reserved GB | step s | last output = reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['strategy']} | {s['steps']} | {fmt(s['rss_gb_range'])} | {fmt(s['allocated_gb_range'], 3)} | "
            f"{fmt(s['reserved_gb_range'], 3)} | {fmt(s['step_s_range'], 3)} | {'yes' if s['last_equals_reference'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd35-medium")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--strategies", default="layerwise-w2,auto-2GB")
    parser.add_argument("--out", type=str, required=True)
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    spec = models.resolve_spec(args.model)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = "cuda:0" if cuda else "cpu"
    os.makedirs(args.out, exist_ok=True)
    summaries = []
    with open(os.path.join(args.out, f"soak_{spec.name}.jsonl"), "w") as out:
        for name in args.strategies.split(","):
            summary = soak(spec, name, args.steps, args.every, device, out)
            summary["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
            out.write(json.dumps(summary) + "\n")
            summaries.append(summary)
    text = table(summaries, summaries[0]["device"])
    with open(os.path.join(args.out, f"soak_{spec.name}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
