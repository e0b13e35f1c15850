"""Where the host's time goes in a step: the model's own code, torch, offload_map's runtime, Triton's launches.

A model whose steps the host paces (SD3.5-medium on the lent H200, ``interleaved.py``) gets slower by every
microsecond the runtime adds per block. For each strategy, one at a time on a copy of the same model: warm-up
forwards, then ``--steps`` forwards back to back under ``cProfile``; the profile's own time per function summed by
package (``offload_map``, ``triton``, ``torch``, ``diffusers``, C calls, other) and divided by the steps, and the
top functions outside ``diffusers``. The profiler slows Python calls (more where they are many and
short), so the shares matter more than the absolute numbers; the wall time per step without the profiler is
recorded beside them.

Usage (GPU, or ``--device cpu`` with a tiny model)::

    python benchmarks/host_cost.py --model sd35-medium --strategies resident,raw,lossless,fp8 --out DIR
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from offload_map import model_zoo as models  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interleaved import place, strategies  # noqa: E402

PACKAGES = ("offload_map", "triton", "torch", "diffusers")
TOP = 20


def package_of(filename: str) -> str:
    if filename == "~":
        return "C calls"  # built-in functions and methods: torch's bindings among them
    parts = filename.replace("\\", "/").split("/")
    return next((p for p in reversed(parts[:-1]) if p in PACKAGES), "other")


def steps(model, inputs: dict, count: int, device: str) -> float:
    """Seconds per forward of ``count`` forwards back to back."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        model(**inputs, return_dict=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / count


def profile(model, inputs: dict, count: int, device: str) -> dict:
    profiler = cProfile.Profile()
    profiler.enable()
    steps(model, inputs, count, device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    by_package: dict[str, float] = {}
    top = []
    for (filename, line, name), (_, calls, own, _, _) in stats.items():
        package = package_of(filename)
        by_package[package] = by_package.get(package, 0.0) + own
        if package != "diffusers":  # the model's own code is the same under every strategy
            top.append((own, calls, f"{filename.split('site-packages/')[-1]}:{line}({name})"))
    top.sort(reverse=True)
    return {
        "ms_per_step": {k: v / count * 1e3 for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])},
        "top": [
            {"ms_per_step": own / count * 1e3, "calls_per_step": calls / count, "function": where}
            for own, calls, where in top[:TOP]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd35-medium")
    parser.add_argument("--strategies", type=strategies, default="resident,raw,lossless,fp8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    spec = models.resolve_spec(args.model)
    built = models.build_model(spec, 0, 0.02, args.device)
    inputs = models.make_inputs(spec, built, args.device, 1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"host_cost_{spec.name}.jsonl")
    for name in args.strategies:
        model = copy.deepcopy(built)
        handle = place(model, name, args.device)
        with torch.inference_mode():
            steps(model, inputs, 3, args.device)  # warm-up (and the learned order)
            wall = steps(model, inputs, args.steps, args.device)
            row = {"strategy": name, "model": spec.name, "device": args.device, "wall_ms_per_step": wall * 1e3}
            row.update(profile(model, inputs, args.steps, args.device))
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        shares = ", ".join(f"{k} {v:.2f}" for k, v in row["ms_per_step"].items())
        print(f"{name}: {row['wall_ms_per_step']:.1f} ms a step unprofiled; profiled host ms a step: {shares}", flush=True)
        for entry in row["top"][:12]:
            print(f"    {entry['ms_per_step']:7.3f} ms  {entry['calls_per_step']:6.0f} calls  {entry['function']}", flush=True)
        if handle is not None:
            handle.remove()
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
