"""Strategies compared under the same host: one model, each strategy dispatched at once on its own copy, bursts of
back-to-back steps taking turns.

SD3.5-medium's steps are paced by the host that issues its many small kernels, and that host's speed swings over
minutes on the lent H200 (README): rows that ``step_time.py`` times one after another may compare different hosts.
Here every round runs, for each strategy in turn (the order rotated by one each round), a burst of ``--burst``
forwards back to back (timed between device events at consecutive forward starts, as ``step_time.py`` times them),
and first a host probe: the host's microseconds per launch of a one-element kernel. Per round and strategy: the
median step, and that step against the floor (the block lists' bytes over the pinned bandwidth, measured as
``step_time.py`` measures it) and against raw streaming's step of the same round.

Strategies: ``resident`` (the whole model on the device), ``raw`` (``layerwise``, window 2), ``lossless`` and
``fp8`` (the same with that ``compression``); ``-wN`` after a streamed one sets the window (``lossless-w3``), and
``-pN`` after a coded one cuts its code in pieces (chunks, for fp8) of N MiB (``lossless-p64``). Outputs are
compared with the resident one (``lossless`` and ``raw`` must be bit-exact). Writes ``DIR/interleaved_<model>.jsonl`` (an env row, then one row per round) and prints a table.

Usage (GPU)::

    python benchmarks/interleaved.py --model sd35-medium --strategies resident,raw,lossless,fp8 --rounds 12 --out DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import offload_map  # noqa: E402
from offload_map import model_zoo as models  # noqa: E402
from offload_map.runtime import coded_host, fp8_host  # noqa: E402

import step_time  # noqa: E402

STREAMED = {"raw": {}, "lossless": {"compression": "lossless"}, "fp8": {"compression": "fp8"}}
LAUNCHES = 2000  # per host probe: a few milliseconds of launches, far from filling the device's queue


NAME = re.compile(r"(?P<kind>raw|lossless|fp8)(-w(?P<window>\d+))?(-p(?P<piece>\d+))?")


def dispatch_options(name: str) -> dict | None:
    """``dispatch_pipeline`` keywords of strategy ``name`` (None: resident); ValueError if it names none."""
    if name == "resident":
        return None
    match = NAME.fullmatch(name)
    if match is None or (match["piece"] and match["kind"] == "raw"):
        raise ValueError(f"unknown strategy {name!r}: resident, or one of {sorted(STREAMED)} with an optional -wN (coded: -pN)")
    return {"strategy": "layerwise", "window": int(match["window"] or 2), **STREAMED[match["kind"]]}


def strategies(text: str) -> list[str]:
    """``--strategies``: comma-separated names, each one ``dispatch_options`` knows (argparse reports the first it
    does not)."""
    names = text.split(",")
    for name in names:
        try:
            dispatch_options(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return names


def place(model, name: str, device: str):
    """Put ``model`` on ``device`` as strategy ``name``: moved whole (resident; returns None), or dispatched (returns
    the handle); with ``-pN``, its code is cut in pieces (lossless) or chunks (fp8) of N MiB, which the code keeps."""
    options = dispatch_options(name)
    if options is None:
        model.to(device)
        return None
    piece = NAME.fullmatch(name)["piece"]
    defaults = coded_host.PIECE, fp8_host.CHUNK
    if piece:
        coded_host.PIECE = fp8_host.CHUNK = int(piece) << 20
    try:
        return offload_map.dispatch_pipeline(model, device=device, **options)
    finally:
        coded_host.PIECE, fp8_host.CHUNK = defaults


def host_probe_us(device: str) -> float:
    """Host microseconds per launch of a one-element kernel (the device idle, so the host's speed alone)."""
    x = torch.zeros(1, device=device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(LAUNCHES):
        x.add_(1)
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return seconds / LAUNCHES * 1e6


def burst(model, inputs: dict, steps: int) -> tuple[list[float], torch.Tensor]:
    """``steps`` forwards back to back; each step's seconds between device events at consecutive starts."""
    torch.cuda.synchronize()
    marks, out = [], None
    for _ in range(steps):
        marks.append(torch.cuda.Event(enable_timing=True))
        marks[-1].record()
        out = model(**inputs, return_dict=False)[0]
    marks.append(torch.cuda.Event(enable_timing=True))
    marks[-1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])], out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd35-medium")
    parser.add_argument("--strategies", type=strategies, default="resident,raw,lossless,fp8")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    names = args.strategies
    if "resident" not in names:
        sys.exit("--strategies must name resident: the reference the outputs are compared with")
    device = "cuda:0"
    spec = models.resolve_spec(args.model)
    built = models.build_model(spec, 0, 0.02, device)
    stats = models.block_stats(built)
    inputs = models.make_inputs(spec, built, device, 1)
    bandwidth = step_time.h2d_bandwidth(1 << 30, True, 10, device)["median_Bps"]
    floor = stats["block_bytes"] / bandwidth
    runs, handles = {}, []
    for name in names:
        runs[name] = built if name == names[-1] else copy.deepcopy(built)
        handles.append(place(runs[name], name, device))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"interleaved_{spec.name}.jsonl")
    env = {
        "kind": "env",
        "model": spec.name,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "block_bytes": stats["block_bytes"],
        "pinned_Bps": bandwidth,
        "floor_s": floor,
        "burst": args.burst,
    }
    with open(path, "w") as f:
        f.write(json.dumps(env) + "\n")
    print(
        f"{spec.name} on {env['device']}: floor {floor * 1e3:.1f} ms ({stats['block_bytes'] / 1e9:.2f} GB at {bandwidth / 1e9:.1f} GB/s)"
    )
    with torch.inference_mode():
        outputs = {name: burst(model, inputs, 2)[1].float().cpu() for name, model in runs.items()}  # warm-up
        exact = {name: bool(torch.equal(out, outputs["resident"])) for name, out in outputs.items()}
        reference = outputs["resident"].abs()
        errors = {name: ((out - outputs["resident"]).abs().max() / reference.max()).item() for name, out in outputs.items()}
        print("bit-exact against resident:", exact, "max relative error:", {k: f"{v:.2e}" for k, v in errors.items()})
        print(
            "round  host us/launch  "
            + "  ".join(f"{n:>{max(9, len(n))}}" for n in names)
            + "  "
            + "  ".join(f"{n}/floor" for n in names[1:])
        )
        for index in range(args.rounds):
            # Each round starts one strategy later: a burst runs slower right after some others (after raw's, in
            # two calls of 2026-12-02), and a fixed order would charge that to whichever strategy follows.
            order = names[index % len(names) :] + names[: index % len(names)]
            row = {"kind": "round", "round": index, "order": order, "host_us_per_launch": host_probe_us(device)}
            row["steps_s"] = {name: burst(runs[name], inputs, args.burst)[0] for name in order}
            row["step_s"] = {name: statistics.median(row["steps_s"][name]) for name in names}
            row["x_floor"] = {name: step / floor for name, step in row["step_s"].items()}
            if "raw" in row["step_s"]:
                row["x_raw"] = {name: step / row["step_s"]["raw"] for name, step in row["step_s"].items()}
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            steps = "  ".join(f"{row['step_s'][n] * 1e3:{max(9, len(n))}.1f}" for n in names)
            ratios = "  ".join(f"{row['x_floor'][n]:>{len(n) + 6}.2f}" for n in names[1:])
            print(f"{index:>5}  {row['host_us_per_launch']:>14.2f}  {steps}  {ratios}", flush=True)
    with open(path, "a") as f:
        f.write(json.dumps({"kind": "outputs", "bit_exact": exact, "max_rel_error": errors}) + "\n")
    for handle in filter(None, handles):
        handle.remove()


if __name__ == "__main__":
    main()
