"""The ``offload-map`` command line (also ``python -m offload_map``); ``DESCRIPTION`` is its help.

A user mistake or a missing optional dependency ends with one line on stderr saying what to do and exit status
2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .dispatch import dispatch_pipeline
from .mapping.compiler import STRATEGIES, compile_device_map
from .mapping.memory import BudgetTooSmall, staging_footprint
from .mapping.sizes import human_bytes, human_rate, parse_size
from .planning.cost_model import TYPICAL_LINK_SHARE
from .planning.planner import plan_blocks, plan_memory
from .planning.profile import DeviceProfile
from .runtime.bandwidth import bandwidth, device_memory, device_name

SHIPPED_PROFILE = Path(__file__).parent / "profiles" / "h100.json"

DESCRIPTION = """\
Compile diffusion pipelines into a device map and run them with weights offloaded.

  offload-map demo [--device DEV] [--steps N]
      builds a tiny pipeline in code, prints its device map, runs it under every strategy and prints each
      report and whether the output matches the resident run
  offload-map profile --model flux-12b --out FILE [--device cuda]
      on a GPU: builds the full-size transformer with random weights, measures the pinned host-to-device
      bandwidth and each block's compute time in one forward at 1024x1024, and adds them to FILE
  offload-map plan --model flux-12b --budget 12GiB [--profile FILE] [--compression lossless|fp8]
      no GPU needed: prints the plan for that budget from a stored profile (default: the shipped H100 one),
      with compression at the share of bytes Flux-12B's bf16 blocks code to
"""


class UsageError(Exception):
    """A mistake on the command line or a missing optional dependency: printed as one line, exit status 2."""


def _needs(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{what} needs {module}, which is not installed: pip install 'offload-map[diffusers]'")


def _demo(args: argparse.Namespace) -> int:
    from .demo import make_tiny_pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = make_tiny_pipeline()
    reference = pipe("a red cat", steps=args.steps)
    print(f"tiny pipeline: {sum(p.numel() for p in pipe.parameters()):,} parameters; target device {device}\n")
    print(compile_device_map(pipe, "layerwise", device, window=args.window))
    total = sum(compile_device_map(pipe, "none", device).bytes_by_placement().values())
    ok = True
    for strategy in STRATEGIES:
        # "auto" gets half the weights as its budget, so that it has something to plan
        budget = {"gpu_budget": total // 2} if strategy == "auto" else {}
        handle = dispatch_pipeline(pipe, strategy, device, window=args.window, **budget)
        start = time.perf_counter()
        image = pipe("a red cat", steps=args.steps)
        elapsed = time.perf_counter() - start
        same = torch.equal(image, reference)
        ok &= same
        print(
            f"\n== strategy {strategy!r}: {elapsed * 1e3:.1f} ms, output {'identical to' if same else 'DIFFERS from'} the resident run"
        )
        print(handle.report())
        if strategy == "auto":
            print(handle.explain().split("\n\n", 1)[-1])
        handle.remove()
    print("\nall strategies bit-identical" if ok else "\nMISMATCH")
    return 0 if ok else 1


def _profile(args: argparse.Namespace) -> int:
    from . import model_zoo

    _needs("diffusers", "building the model to profile")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {args.device}: CUDA is not available on this machine; profile on a GPU, or pass "
            "--device cpu to time the model on the CPU"
        )
    device = torch.device(args.device)
    spec = model_zoo.resolve_spec(args.model)
    print(f"building {spec.name} ({spec.class_name}) with random weights...", flush=True)
    model = model_zoo.build_model(spec, seed=0, gen_device=args.device)
    inputs = model_zoo.make_inputs(spec, model, device, seed=1)
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    handle = dispatch_pipeline(model, "auto", device, gpu_budget=total // 2)
    with torch.inference_mode():
        for _ in range(2):  # the first forward warms CUDA up; the second is timed
            model(**inputs, return_dict=False)
    cost = handle.plans[""].cost
    handle.remove()
    path = Path(args.out)
    profile = (
        DeviceProfile.load(path)
        if path.exists()
        else DeviceProfile(device_name(device), bandwidth(device), {}, device_memory(device))
    )
    if profile.device_name != device_name(device):
        print(f"{path} holds a profile of {profile.device_name}, not {device_name(device)}; use another --out", file=sys.stderr)
        return 2
    profile.models[spec.name] = cost
    profile.save(path)
    print(
        f"{spec.name}: {len(cost.blocks)} blocks, compute {cost.compute_s * 1e3:.1f} ms per forward, "
        f"activations {cost.activation_bytes / 2**30:.2f} GiB; bandwidth {human_rate(profile.h2d_bytes_per_s)} -> {path}"
    )
    return 0


def _plan(args: argparse.Namespace) -> int:
    try:
        profile = DeviceProfile.load(args.profile)
    except OSError as err:
        raise UsageError(f"cannot read the profile {args.profile}: {err.strerror or err}") from None
    if args.model not in profile.models:
        raise UsageError(f"profile {args.profile} has no model {args.model!r}; it has {sorted(profile.models)}")
    cost = profile.models[args.model]
    budget = parse_size(args.budget, "--budget")
    rate, staging, coded = profile.h2d_bytes_per_s, 0, ""
    if args.compression:
        # Coded blocks cross the link in fewer bytes (plans count raw bytes, so at a higher rate) and copy through
        # staging buffers, which the budget holds too.
        share = TYPICAL_LINK_SHARE[args.compression]
        rate /= share
        staging = staging_footprint(max((b.nbytes for b in cost.blocks), default=0))
        coded = (
            f", {args.compression} compression (blocks cross the link in about {share:.3f} of their bytes; "
            f"{human_bytes(staging)} of staging buffers out of the budget)"
        )
    try:
        plan = plan_blocks(cost, budget - staging, rate)
    except BudgetTooSmall as err:  # in the user's terms: the budget given, and a minimum with the staging buffers
        raise BudgetTooSmall(budget, err.minimum + staging) from None
    print(f"{args.model} on {profile.device_name} ({human_rate(profile.h2d_bytes_per_s)}), budget {args.budget}{coded}:\n")
    print(plan.explain())
    whole = plan_memory(cost, frozenset(), 1)
    if budget > whole:
        print(f"\nnote: {args.budget} is more than this model needs ({human_bytes(whole)} with every block resident)")
    if profile.device_memory_bytes and budget > profile.device_memory_bytes:
        print(f"note: {args.budget} is more than the {human_bytes(profile.device_memory_bytes)} that {profile.device_name} has")
    return 0


def _known_models(path: Path) -> str:
    try:
        return ", ".join(sorted(DeviceProfile.load(path).models))
    except (OSError, ValueError):
        return "see the profile"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``offload-map`` console script and of ``python -m offload_map``."""
    parser = argparse.ArgumentParser(
        prog="offload-map", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a tiny pipeline under every strategy and print the device map and reports")
    demo.add_argument("--device", help="target device (default: cuda if available, else cpu)")
    demo.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    demo.add_argument("--window", type=int, default=2, help="layer-window slots (default 2)")
    profile = sub.add_parser("profile", help="measure a model's per-block costs and the bandwidth on this GPU")
    profile.add_argument("--model", required=True, help="flux-12b, sd35-medium, tiny-flux or a diffusers config.json")
    profile.add_argument("--out", required=True, help="device profile JSON to create or extend")
    profile.add_argument("--device", default="cuda", help="device to profile (default cuda)")
    plan = sub.add_parser("plan", help="print the plan for a budget from a stored profile (no GPU needed)")
    plan.add_argument(
        "--model", required=True, help=f"a model in the profile (the shipped one has: {_known_models(SHIPPED_PROFILE)})"
    )
    plan.add_argument("--budget", required=True, help="device memory for the DiT, e.g. 12GiB or 12GB")
    plan.add_argument("--profile", default=str(SHIPPED_PROFILE), help="device profile JSON (default: the shipped H100 profile)")
    plan.add_argument(
        "--compression",
        choices=sorted(TYPICAL_LINK_SHARE),
        help="plan as dispatch_pipeline(..., compression=...) would, at the share of bytes Flux-12B's bf16 blocks code to",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        return {"demo": _demo, "profile": _profile, "plan": _plan}[args.command](args)
    except (UsageError, ValueError) as err:
        print(f"offload-map {args.command}: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (``offload-map plan ... | head -1``): nothing more to print, and nothing wrong.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
