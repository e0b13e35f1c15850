"""Time one transformer forward under several offload strategies, all in one process.

Usage (GPU)::

    python benchmarks/step_time.py --model flux-12b --out DIR \\
        [--strategies resident,layerwise-w1,layerwise-w2,layerwise-w3,layerwise-w4,\\
diffusers-block,diffusers-leaf,accelerate-cpu] [--repeats 3] [--warmup 1]

Usage (no GPU, checks the script itself)::

    python benchmarks/step_time.py --model tiny-flux --out DIR --cpu-smoke

``--model`` is ``flux-12b``, ``sd35-medium``, ``tiny-flux`` or a diffusers ``config.json`` path (see
``offload_map/model_zoo.py``). The model is built with random bf16 weights straight into CPU memory, as
a user's loaded checkpoint would be, and is rebuilt from the same seed before every strategy, so no
strategy sees another's leftovers. Each strategy's own undo (``.to("cpu")``, ``handle.remove()``,
hook removal) still runs and its result is recorded (``restored``).

Strategies:

* ``resident``         ``model.to(device)``
* ``layerwise-wN``     ``offload_map.dispatch_pipeline(model, strategy="layerwise", device=..., window=N)``
* ``diffusers-block``  ``model.enable_group_offload(..., offload_type="block_level",
  num_blocks_per_group=1, use_stream=True)``
* ``diffusers-leaf``   the same with ``offload_type="leaf_level"``
* ``accelerate-cpu``   ``accelerate.cpu_offload(model, execution_device=device)``
* ``auto-<N>GiB``      ``offload_map.dispatch_pipeline(model, strategy="auto", gpu_budget="<N>GiB")`` (also
  ``<N>GB``, 10**9 bytes); ``auto-unlimited`` gives it the device's whole memory
* ``layerwise-wN-lossless``, ``auto-<N>GiB-lossless``  the same with ``compression="lossless"`` (streamed
  blocks coded in host memory, decoded on the device); the row adds the coded/raw byte ratio
* ``layerwise-wN-fp8``, ``auto-<N>GiB-fp8``  the same with ``compression="fp8"`` (lossy: linear weights in
  float8); the row adds the output's max and mean relative error against the resident output
* ``<any>-compiled``   the same after ``model.compile_repeated_blocks()`` (inductor; the warm-up forwards compile)
* ``before-layerwise-wN``, ``before-auto-<N>GiB``  the same with offload_map as it was before a change: the
  package in ``--before DIR`` (``DIR/offload_map``, e.g. ``git archive <commit> offload_map | tar -x -C DIR``),
  loaded under another name, so before and after run in one process on one machine

Per strategy: setup seconds; after ``--warmup`` untimed forwards, the median/min/all of ``--repeats``
forwards run back to back (device events at each forward's start) and the median of ``--repeats`` more,
each bracketed by device synchronisation (see ``time_forwards``); peak GPU memory (allocated and reserved, peak reset before warm-up), host RSS after
setup and its peak (sampled by a thread during setup and timing; VmHWM is process-lifetime), and
whether the output equals the resident output bit for bit. The environment row holds the pinned and
pageable host-to-device bandwidth and the floor: bytes of the block lists / pinned bandwidth.

Host RSS after setup is read after ``malloc_trim`` (freed weights otherwise linger in malloc's heap);
between strategies the model is dropped, and GPU memory, cached pinned blocks and free heap released.
Forwards run under ``torch.inference_mode()`` (``--grad-mode no_grad`` to change); a strategy whose
forward fails under inference_mode is retried once under no_grad and says so in its row.
``--layerwise-via pipeline`` hands ``dispatch_pipeline`` a holder object with ``.transformer``
instead of the bare model (a workaround, should the bare-module path break).

Writes ``DIR/step_time_<model>.jsonl`` (one env row, one row per strategy, appended as they finish)
and ``DIR/step_time_<model>.md`` (rewritten after every strategy), and prints the table at the end.
In ``--cpu-smoke`` mode everything runs on CPU: diffusers' group offload runs without streams
(streams need CUDA), and the GPU columns are empty.

Cost on one H100 80GB (measured): flux-12b about 6 minutes, host RSS peak about 62 GB (diffusers
pins a power-of-two-rounded copy, ~37 GB, while the 24 GB model is still alive); sd35-medium about
2 minutes and 14 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offload_map import model_zoo as models  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_STRATEGIES = "resident,layerwise-w1,layerwise-w2,layerwise-w3,layerwise-w4,diffusers-block,diffusers-leaf,accelerate-cpu"
GB = 1e9
GIB = 2**30


# ----------------------------------------------------------------------------- host memory


def read_status_bytes(field_name: str, path: str = "/proc/self/status") -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, ...), or of ``path`` (/proc/meminfo), in bytes; None off
    Linux."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples VmRSS in a background thread; ``peak`` is the largest value seen while running."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.peak = read_status_bytes("VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> int | None:
        rss = read_status_bytes("VmRSS")
        if rss is not None and (self.peak is None or rss > self.peak):
            self.peak = rss
        return rss

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def trim_host_heap() -> None:
    """Return free heap pages to the OS, so RSS shows live memory, not what malloc keeps for reuse."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def release_host_and_device_memory(cuda: bool) -> None:
    """Collect garbage, drop cached GPU and pinned-host blocks, and give free heap back to the OS."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        # Pinned blocks are cached, not freed. torch 2.13 names the call torch.accelerator.empty_host_cache; the older
        # private name is gone from it, so this released nothing there.
        host_empty = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()
    trim_host_heap()


def pinned_host_stats() -> dict:
    """Pinned (caching host allocator) bytes, current and peak, where this torch reports them."""
    try:
        stats = torch.cuda.host_memory_stats()
    except Exception:
        return {}
    keys = ("allocated_bytes.current", "allocated_bytes.peak")
    return {f"pinned_{k.replace('.', '_')}": stats[k] for k in keys if k in stats}


# ----------------------------------------------------------------------------- device helpers


@dataclass
class Ctx:
    """What every strategy needs: the device, inputs, reference output and run settings."""

    args: argparse.Namespace
    spec: models.ModelSpec
    device: str  # "cuda:0" or "cpu"
    inputs: dict = field(default_factory=dict)
    reference: torch.Tensor | None = None
    build_fingerprint: torch.Tensor | None = None
    handle: object = None  # the offload_map handle of an "auto" strategy, for its plan summary
    coded: object = None  # a -lossless row's dispatch Report, for its coded_summary

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def gen_device(ctx: Ctx) -> str:
    return ctx.device if ctx.cuda else "cpu"


def build_model(ctx: Ctx) -> torch.nn.Module:
    return models.build_model(ctx.spec, ctx.args.seed, ctx.args.weight_std, gen_device(ctx))


# ----------------------------------------------------------------------------- bandwidth


def copy_seconds(src: torch.Tensor, dst: torch.Tensor, iters: int) -> list[float]:
    """Wall seconds of ``iters`` host-to-device copies (after one untimed copy)."""
    dst.copy_(src, non_blocking=src.is_pinned())
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=src.is_pinned())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def h2d_bandwidth(nbytes: int, pinned: bool, iters: int, device: str) -> dict:
    """Median host-to-device bandwidth (bytes/s) of an ``nbytes`` pinned or pageable buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)  # touch every page before timing
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = copy_seconds(src, dst, iters)
    del src, dst
    return {
        "bytes": nbytes,
        "pinned": pinned,
        "median_Bps": nbytes / statistics.median(times),
        "max_Bps": nbytes / min(times),
        "times_s": times,
    }


def measure_bandwidths(largest_block_bytes: int, device: str) -> dict:
    """Pinned 1 GiB and largest-block copies (median of 10) plus a pageable 1 GiB reference (median of 5)."""
    gib = 1 << 30
    out = {
        "pinned_1GiB": h2d_bandwidth(gib, True, 10, device),
        "pinned_largest_block": h2d_bandwidth(max(largest_block_bytes, 1 << 20), True, 10, device),
        "pageable_1GiB": h2d_bandwidth(gib, False, 5, device),
    }
    release_host_and_device_memory(cuda=True)
    return out


# ----------------------------------------------------------------------------- strategies


def remove_group_offload(model: torch.nn.Module) -> None:
    """Undo ``enable_group_offload``: diffusers 0.42 has no public disable, so drop its hooks by name.

    Removing a diffusers hook restores the module's ``forward``. Parameters are left wherever the
    last offload put them: on CPU, in the pinned copies made by ``use_stream=True``.
    """
    from diffusers.hooks import HookRegistry
    from diffusers.hooks import group_offloading as go

    registry = HookRegistry.check_if_exists_or_initialize(model)
    names = (
        getattr(go, "_GROUP_OFFLOADING", "group_offloading"),
        getattr(go, "_LAYER_EXECUTION_TRACKER", "layer_execution_tracker"),
        getattr(go, "_LAZY_PREFETCH_GROUP_OFFLOADING", "lazy_prefetch_group_offloading"),
    )
    for name in names:
        registry.remove_hook(name, recurse=True)
    model.to("cpu")


def setup_resident(model, ctx: Ctx):
    model.to(ctx.device)
    return lambda: model.to("cpu")


class TransformerHolder:
    """A pipeline-like object whose one component is ``transformer`` (for ``--layerwise-via pipeline``)."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer


def offload_map_package(ctx: Ctx, before: bool):
    """offload_map itself, or (``before``) the package in ``--before DIR`` loaded as ``offload_map_before``."""
    import importlib
    import importlib.util

    if not before:
        return importlib.import_module("offload_map")
    if "offload_map_before" not in sys.modules:
        if not ctx.args.before:
            sys.exit("before-* strategies need --before DIR (a folder holding the earlier offload_map package)")
        root = os.path.join(ctx.args.before, "offload_map")
        spec = importlib.util.spec_from_file_location(
            "offload_map_before", os.path.join(root, "__init__.py"), submodule_search_locations=[root]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["offload_map_before"] = module
        spec.loader.exec_module(module)
    return sys.modules["offload_map_before"]


def compression_options(compression: str | None) -> dict:
    return {} if compression is None else {"compression": compression}


def make_layerwise(window: int, before: bool = False, compression: str | None = None):
    def setup_layerwise(model, ctx: Ctx):
        offload_map = offload_map_package(ctx, before)
        target = model if ctx.args.layerwise_via == "model" else TransformerHolder(model)
        handle = offload_map.dispatch_pipeline(
            target, strategy="layerwise", device=ctx.device, window=window, **compression_options(compression)
        )
        ctx.coded = handle.report() if compression else None
        return handle.remove

    return setup_layerwise


def make_auto(budget: str | None, before: bool = False, compression: str | None = None):
    """``strategy="auto"`` within ``budget`` (e.g. ``"12GiB"``, ``"12GB"``); None means the device's whole memory."""

    def setup_auto(model, ctx: Ctx):
        offload_map = offload_map_package(ctx, before)
        size = budget or (torch.cuda.mem_get_info()[1] if ctx.cuda else 10**15)
        handle = offload_map.dispatch_pipeline(
            model, strategy="auto", device=ctx.device, gpu_budget=size, **compression_options(compression)
        )
        ctx.handle = handle
        ctx.coded = handle.report() if compression else None
        return handle.remove

    return setup_auto


def coded_summary(ctx: Ctx) -> dict:
    """For ``-lossless`` rows: how many streamed blocks were coded, their coded/raw bytes, where setup time went."""
    report = getattr(ctx, "coded", None)
    ctx.coded = None
    coded = report.coded if report is not None else None
    if coded is None:  # nothing streams (the model fits the budget whole): nothing was coded
        return {}
    return {
        "setup_breakdown": str(report.setup_times),
        "coded_blocks": coded.coded,
        "streamed_blocks_total": coded.blocks,
        "coded_raw_bytes": coded.raw_bytes,
        "coded_bytes": coded.coded_bytes,
        "coded_ratio": coded.coded_bytes / coded.raw_bytes if coded.raw_bytes else None,
    }


def plan_summary(ctx: Ctx) -> dict:
    """What the auto planner chose and predicted, once the calibration forward has run."""
    handle = getattr(ctx, "handle", None)
    ctx.handle = None
    plan = next(iter(handle.plans.values()), None) if handle is not None else None
    if plan is None:
        return {"planned": False, "predicted_step_s": None}
    return {
        "planned": True,
        "budget_bytes": plan.budget,
        "predicted_step_s": plan.step_s,
        "window": plan.window,
        "resident_blocks": len(plan.resident),
        "streamed_blocks": len(plan.streamed),
        "streamed_bytes": plan.streamed_bytes,
        "kept_blocks": len(plan.kept),
        "predicted_peak_bytes": plan.memory,
        "activation_bytes": plan.cost.activation_bytes,
        "measured_compute_s": plan.cost.compute_s,
        "planner_bandwidth_Bps": plan.bandwidth,
        "explain": plan.explain(),
    }


def make_group_offload(offload_type: str):
    def setup_group_offload(model, ctx: Ctx):
        kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
        model.enable_group_offload(
            onload_device=torch.device(ctx.device),
            offload_device=torch.device("cpu"),
            offload_type=offload_type,
            use_stream=ctx.cuda,  # streams need CUDA; the CPU smoke run goes without
            **kwargs,
        )
        return lambda: remove_group_offload(model)

    return setup_group_offload


def setup_accelerate(model, ctx: Ctx):
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    cpu_offload(model, execution_device=torch.device(ctx.device))

    def undo():
        remove_hook_from_module(model, recurse=True)  # puts the weights_map tensors back
        model.to("cpu")  # buffers were moved to the execution device

    return undo


def compiled(setup):
    """``setup`` after diffusers' regional compilation (``compile_repeated_blocks``, inductor)."""

    def setup_compiled(model, ctx: Ctx):
        torch._dynamo.reset()
        model.compile_repeated_blocks()
        undo = setup(model, ctx)
        return lambda: (undo(), torch._dynamo.reset())

    return setup_compiled


def strategy_setup(name: str):
    """The setup function for a strategy name (``<name>-compiled``: after regional compilation); it returns
    the undo callable."""
    if name.endswith("-compiled"):
        return compiled(strategy_setup(name.removesuffix("-compiled")))
    compression = next((c for c in ("lossless", "fp8") if name.endswith(f"-{c}")), None)
    name = name.removesuffix(f"-{compression}")
    fixed = {
        "resident": setup_resident,
        "diffusers-block": make_group_offload("block_level"),
        "diffusers-leaf": make_group_offload("leaf_level"),
        "accelerate-cpu": setup_accelerate,
    }
    if name in fixed:
        return fixed[name]
    before = name.startswith("before-")
    match = re.fullmatch(r"layerwise-w(\d+)", name.removeprefix("before-"))
    if match:
        return make_layerwise(int(match.group(1)), before, compression)
    match = re.fullmatch(r"auto-(\d+(?:\.\d+)?(?:GB|GiB))|auto-unlimited", name.removeprefix("before-"))
    if match:
        return make_auto(match.group(1), before, compression)
    raise ValueError(f"unknown strategy {name!r}")


def smoke_note(name: str, ctx: Ctx) -> str | None:
    if ctx.cuda:
        return None
    if name.startswith("diffusers-"):
        return "cpu smoke: onload_device=cpu, use_stream=False (streams need CUDA); not a timing"
    return "cpu smoke: device=cpu; not a timing"


# ----------------------------------------------------------------------------- one strategy


def grad_context(mode: str):
    return torch.inference_mode() if mode == "inference" else torch.no_grad()


def forward(model, ctx: Ctx) -> torch.Tensor:
    return model(**ctx.inputs, return_dict=False)[0]


def time_forwards(model, ctx: Ctx, grad_mode: str) -> tuple[list[float], list[float], list[float], torch.Tensor]:
    """Warm-up forwards, then ``repeats`` forwards back to back as a denoising loop runs them (no host
    synchronisation between steps, so one step's prefetch of the next step's first blocks overlaps that step),
    each timed between device events at consecutive forward starts; then ``repeats`` more, each bracketed by
    device synchronisation (what a loop that waits for every step, e.g. to print a latent statistic, sees)."""

    def one_at_a_time(count: int) -> list[float]:
        nonlocal out
        seconds = []
        for _ in range(count):
            ctx.sync()
            t0 = time.perf_counter()
            out = forward(model, ctx)
            ctx.sync()
            seconds.append(time.perf_counter() - t0)
        return seconds

    out = None
    with grad_context(grad_mode):
        warm = one_at_a_time(ctx.args.warmup)
        marks = []
        for _ in range(ctx.args.repeats):
            marks.append(device_mark(ctx))
            out = forward(model, ctx)
        marks.append(device_mark(ctx))
        ctx.sync()
        looped = [mark_seconds(a, b) for a, b in zip(marks, marks[1:])]
        synced = one_at_a_time(ctx.args.repeats)
    return warm, looped, synced, out


def device_mark(ctx: Ctx):
    """A point in time on the device's queue (an event on CUDA), or the host clock on the CPU."""
    if not ctx.cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def mark_seconds(start, end) -> float:
    return start.elapsed_time(end) / 1e3 if isinstance(start, torch.cuda.Event) else end - start


def gpu_peak(ctx: Ctx) -> dict:
    if not ctx.cuda:
        return {"peak_gpu_alloc_bytes": None, "peak_gpu_reserved_bytes": None}
    return {
        "peak_gpu_alloc_bytes": torch.cuda.max_memory_allocated(),
        "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(),
    }


def compare_output(out: torch.Tensor, ctx: Ctx) -> dict:
    out = out.detach().to("cpu")
    res = {"output_finite": bool(torch.isfinite(out).all()), "output_shape": list(out.shape)}
    if ctx.reference is None:
        return {**res, "bit_exact": None, "max_abs_diff": None}
    same_shape = out.shape == ctx.reference.shape
    if not same_shape:
        return {**res, "bit_exact": False, "max_abs_diff": None}
    diff = (out.float() - ctx.reference.float()).abs()
    reference = ctx.reference.float().abs()
    return {
        **res,
        "bit_exact": bool(torch.equal(out, ctx.reference)),
        "max_abs_diff": diff.max().item(),
        # For lossy rows (-fp8): the largest error against the output's largest magnitude, and the mean error
        # against the mean magnitude.
        "max_rel_error": (diff.max() / reference.max()).item(),
        "mean_rel_error": (diff.mean() / reference.mean()).item(),
    }


def placement_report(model, ctx: Ctx) -> dict:
    """After undo: where the tensors are, hooks left over, and whether the weights came back intact."""
    devices = sorted({str(t.device) for t in list(model.parameters()) + list(model.buffers())})
    hooks = sum(1 for m in model.modules() if getattr(m, "_hf_hook", None) is not None)
    hooks += sum(len(m._diffusers_hook.hooks) for m in model.modules() if hasattr(m, "_diffusers_hook"))
    fp = models.fingerprint(model)
    intact = fp is not None and ctx.build_fingerprint is not None and torch.equal(fp, ctx.build_fingerprint)
    return {
        "devices_after_undo": devices,
        "hooks_after_undo": hooks,
        "weights_intact_after_undo": intact,
        "restored": devices == ["cpu"] and hooks == 0 and intact,
    }


def timing_summary(warm: list[float], timed: list[float], synced: list[float]) -> dict:
    return {
        "step_s": statistics.median(timed) if timed else None,
        "step_min_s": min(timed) if timed else None,
        "step_times_s": timed,
        "step_synced_s": statistics.median(synced) if synced else None,
        "step_synced_times_s": synced,
        "warmup_times_s": warm,
    }


def measure(name: str, model, ctx: Ctx, row: dict, grad_mode: str, undo_box: list) -> None:
    """Setup, then warm-up + timed forwards and the output check, filling ``row``; undo goes to ``undo_box``."""
    row["failed_in"] = "setup"
    t0 = time.perf_counter()
    undo_box.append(strategy_setup(name)(model, ctx))
    ctx.sync()
    row["setup_s"] = time.perf_counter() - t0
    trim_host_heap()  # not timed; the weights a strategy copied away from may sit in malloc's free lists
    row["rss_after_setup_bytes"] = read_status_bytes("VmRSS")
    row["gpu_alloc_after_setup_bytes"] = torch.cuda.memory_allocated() if ctx.cuda else None
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    row["failed_in"] = "forward"
    warm, timed, synced, out = time_forwards(model, ctx, grad_mode)
    row.update(
        timing_summary(warm, timed, synced),
        **gpu_peak(ctx),
        **compare_output(out, ctx),
        **plan_summary(ctx),
        **coded_summary(ctx),
    )
    if name == "resident":
        assert row["output_finite"], "resident output is not finite; lower --weight-std"
        ctx.reference = out.detach().to("cpu")
        row.update(bit_exact=True, max_abs_diff=0.0)
    row["failed_in"] = None


def undo_and_check(undo, model, ctx: Ctx, row: dict) -> None:
    """Run the strategy's own undo and record where the weights ended up."""
    t0 = time.perf_counter()
    undo()
    row["undo_s"] = time.perf_counter() - t0
    row.update(placement_report(model, ctx))


def record_error(row: dict, exc: Exception) -> None:
    message = f"{type(exc).__name__}: {exc}"
    row["error"] = f"{row['error']}; then {message}" if row.get("error") else message
    row["traceback"] = row.get("traceback", "") + traceback.format_exc()


def attempt(name: str, model, ctx: Ctx, grad_mode: str) -> dict:
    """One try of a strategy on ``model``; any exception becomes the row's ``error``.

    Host RSS is sampled during setup and the forwards only; the undo runs afterwards.
    """
    row = {
        "kind": "strategy",
        "strategy": name,
        "grad_mode": grad_mode,
        "note": smoke_note(name, ctx),
        "rss_before_setup_bytes": read_status_bytes("VmRSS"),
    }
    if ctx.cuda:
        row["gpu_alloc_before_setup_bytes"] = torch.cuda.memory_allocated()
        with contextlib.suppress(Exception):  # so pinned_allocated_bytes_peak is this strategy's
            torch.cuda.reset_peak_host_memory_stats()
    undo_box: list = []
    with RssSampler() as sampler:
        try:
            measure(name, model, ctx, row, grad_mode, undo_box)
        except Exception as exc:  # noqa: BLE001 - a failing strategy must not stop the others
            record_error(row, exc)
    row["rss_peak_bytes"] = sampler.peak
    row["vmhwm_bytes"] = read_status_bytes("VmHWM")
    if ctx.cuda:
        row.update(pinned_host_stats())
    if undo_box:
        try:
            undo_and_check(undo_box.pop(), model, ctx, row)
        except Exception as exc:  # noqa: BLE001
            record_error(row, exc)
            row["failed_in"] = row["failed_in"] or "undo"
    return row


def fresh_model(ctx: Ctx, spare: list) -> tuple[torch.nn.Module, float]:
    """The spare model built for the environment row if still unused, else a rebuild; and build seconds."""
    if spare:
        return spare.pop(), 0.0
    t0 = time.perf_counter()
    model = build_model(ctx)
    return model, time.perf_counter() - t0


def run_strategy(name: str, ctx: Ctx, spare: list) -> dict:
    """Run ``name`` on a freshly built model; if its forward fails under inference_mode, retry under no_grad."""
    model, build_s = fresh_model(ctx, spare)
    row = attempt(name, model, ctx, ctx.args.grad_mode)
    del model
    release_host_and_device_memory(ctx.cuda)
    if row.get("failed_in") == "forward" and ctx.args.grad_mode == "inference" and ctx.args.retry_no_grad:
        print(f"    {name}: forward failed under inference_mode ({row['error']}); retrying under no_grad", flush=True)
        model, build_s = fresh_model(ctx, spare)
        retry = attempt(name, model, ctx, "no_grad")
        del model
        release_host_and_device_memory(ctx.cuda)
        retry["inference_mode_error"] = row["error"]
        row = retry
    row["build_s"] = build_s
    return row


# ----------------------------------------------------------------------------- environment


def versions() -> dict:
    import accelerate
    import diffusers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
    }
    try:
        import offload_map

        where = getattr(offload_map, "__file__", None) or next(iter(getattr(offload_map, "__path__", [])), "?")
        out["offload_map"] = f"{getattr(offload_map, '__version__', '?')} @ {where}"
    except Exception as exc:  # noqa: BLE001 - recorded, the layerwise rows will show the failure
        out["offload_map"] = f"import failed: {type(exc).__name__}: {exc}"
    return out


def host_info() -> dict:
    mem = {}
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key in ("MemTotal", "MemAvailable"):
                    mem[key] = int(value.split()[0]) * 1024
    return {
        "cpu_count": os.cpu_count(),
        "host_mem_total_bytes": mem.get("MemTotal"),
        "host_mem_available_bytes": mem.get("MemAvailable"),
        "platform": platform.platform(),
    }


def check_smoke_size(ctx: Ctx) -> None:
    """Refuse to materialise a big model on CPU in smoke mode (the meta build is cheap)."""
    n = models.block_stats(models.build_meta_model(ctx.spec))["num_params"]
    if n > 200_000_000:
        sys.exit(f"--cpu-smoke builds the model on CPU; {ctx.spec.name} has {n / 1e9:.1f} B parameters. Use --model tiny-flux.")


def prepare(ctx: Ctx) -> tuple[dict, list]:
    """Build the first model, measure bandwidth, make inputs; return the env row and the spare model."""
    if not ctx.cuda:
        check_smoke_size(ctx)
    t0 = time.perf_counter()
    model = build_model(ctx)
    build_s = time.perf_counter() - t0
    stats = models.block_stats(model)
    ctx.build_fingerprint = models.fingerprint(model)
    ctx.inputs = models.make_inputs(ctx.spec, model, ctx.device, ctx.args.seed + 1)
    env = {
        "kind": "env",
        "model": ctx.spec.name,
        "class_name": ctx.spec.class_name,
        "config": dict(ctx.spec.config),
        "resolution": ctx.spec.resolution,
        "text_len": ctx.spec.text_len,
        "inputs": models.describe_inputs(ctx.inputs),
        "device": ctx.device,
        "cpu_smoke": not ctx.cuda,
        "device_name": torch.cuda.get_device_name(ctx.device) if ctx.cuda else platform.processor() or "cpu",
        **versions(),
        **host_info(),
        **stats,
        "build_s": build_s,
        "rss_after_build_bytes": read_status_bytes("VmRSS"),
        "grad_mode": ctx.args.grad_mode,
        "warmup": ctx.args.warmup,
        "repeats": ctx.args.repeats,
        "seed": ctx.args.seed,
        "weight_std": ctx.args.weight_std,
        "pinned_Bps": None,
        "pageable_Bps": None,
        "floor_s": None,
    }
    if ctx.cuda:
        bw = measure_bandwidths(stats["largest_block_bytes"], ctx.device)
        env.update(
            bandwidth=bw,
            pinned_Bps=bw["pinned_1GiB"]["median_Bps"],
            pinned_largest_block_Bps=bw["pinned_largest_block"]["median_Bps"],
            pageable_Bps=bw["pageable_1GiB"]["median_Bps"],
        )
        env["floor_s"] = stats["block_bytes"] / env["pinned_Bps"]
    return env, [model]


def warn_host_memory(env: dict) -> None:
    """diffusers' streamed group offload pins a power-of-two-rounded copy while the original is alive."""
    need = 2.7 * env["model_bytes"]
    avail = env.get("host_mem_available_bytes")
    if avail is not None and avail < need:
        print(f"WARNING: {avail / GB:.0f} GB host memory available; the diffusers rows may need ~{need / GB:.0f} GB", flush=True)


# ----------------------------------------------------------------------------- reporting


def add_ratios(row: dict, env: dict, rows: list[dict]) -> None:
    """step / floor and step / max(resident step, floor), where those are known."""
    resident = next((r.get("step_s") for r in rows + [row] if r["strategy"] == "resident"), None)
    floor, step = env.get("floor_s"), row.get("step_s")
    if row.get("streamed_bytes") is not None and env.get("pinned_Bps"):
        floor = row["streamed_bytes"] / env["pinned_Bps"]  # a plan that keeps blocks resident streams less
    bound = max(x for x in (resident, floor) if x is not None) if (resident or floor) else None
    row["floor_s"] = floor
    row["resident_step_s"] = resident
    row["x_floor"] = step / floor if step and floor else None
    row["x_max_resident_floor"] = step / bound if step and bound else None


def fmt(value, spec: str = ".3f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def table_line(row: dict) -> str:
    if row.get("error"):
        step = f"ERROR in {row.get('failed_in')}"
    else:
        step = fmt(row.get("step_s"))
    gpu = f"{fmt(row.get('peak_gpu_alloc_bytes'), '.2f', GIB)} / {fmt(row.get('peak_gpu_reserved_bytes'), '.2f', GIB)}"
    rss = f"{fmt(row.get('rss_after_setup_bytes'), '.1f', GB)} / {fmt(row.get('rss_peak_bytes'), '.1f', GB)}"
    exact = "-" if row.get("bit_exact") is None else ("yes" if row["bit_exact"] else f"no ({row['max_abs_diff']:.3g})")
    cells = [
        row["strategy"],
        step,
        fmt(row.get("step_synced_s")),
        fmt(row.get("x_floor"), ".2f"),
        fmt(row.get("x_max_resident_floor"), ".2f"),
        fmt(row.get("predicted_step_s")),
        gpu,
        rss,
        fmt(row.get("setup_s"), ".2f"),
        exact,
    ]
    return "| " + " | ".join(cells) + " |"


def env_lines(env: dict) -> list[str]:
    bw = (
        "-"
        if env["pinned_Bps"] is None
        else (
            f"pinned {env['pinned_Bps'] / GB:.1f} GB/s (1 GiB), {env['pinned_largest_block_Bps'] / GB:.1f} GB/s "
            f"({env['largest_block_bytes'] / GB:.2f} GB block); pageable {env['pageable_Bps'] / GB:.1f} GB/s"
        )
    )
    return [
        f"# step_time: {env['model']} ({env['class_name']}, {env['num_params'] / 1e9:.2f} B params, "
        f"{env['model_bytes'] / GB:.2f} GB bf16)",
        "",
        f"- device: {env['device_name']}; torch {env['torch']} (CUDA {env['torch_cuda']}), diffusers "
        f"{env['diffusers']}, accelerate {env['accelerate']}; offload_map {env['offload_map']}",
        f"- inputs: {json.dumps(env['inputs'])}; {env['grad_mode']}; warmup {env['warmup']}, repeats {env['repeats']}",
        f"- streamed bytes ({' + '.join(env['block_attrs'])}, {env['num_blocks']} blocks): "
        f"{env['block_bytes'] / GB:.2f} GB; H2D {bw}",
        f"- floor = streamed bytes / pinned bandwidth = {fmt(env['floor_s'])} s (for auto-* rows: the bytes that plan "
        "streams); predicted s: the planner's prediction from the calibration forward",
        "- step s: median of the timed forwards run back to back, as a denoising loop runs them (device events at "
        "each forward's start); synced s: median of forwards each bracketed by device synchronisation; x ratios use "
        "step s; peak GPU GiB (2**30 bytes, the unit of the auto-*GiB budgets): max allocated / reserved after "
        "warm-up began; host RSS GB: after setup / peak during setup + timing",
        "",
    ]


def render_markdown(env: dict, rows: list[dict]) -> str:
    header = [
        "| strategy | step s | synced s | x floor | x max(resident,floor) | predicted s | peak GPU GiB | host RSS GB | setup s | bit-exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines = env_lines(env) + header + [table_line(r) for r in rows]
    notes = [f"- {r['strategy']}: {r['note']}" for r in rows if r.get("note")]
    notes += [
        f"- {r['strategy']}: ran under no_grad; inference_mode failed: {r['inference_mode_error']}"
        for r in rows
        if r.get("inference_mode_error")
    ]
    notes += [f"- {r['strategy']} (failed in {r.get('failed_in')}): {r['error']}" for r in rows if r.get("error")]
    notes += [
        f"- {r['strategy']}: {r['coded_blocks']} of {r['streamed_blocks_total']} streamed blocks coded, "
        f"{r['coded_bytes'] / 1e9:.2f} GB of {r['coded_raw_bytes'] / 1e9:.2f} GB raw ({r['coded_ratio']:.3f})"
        + (
            f"; output error max {r['max_rel_error']:.2e}, mean {r['mean_rel_error']:.2e} (relative)"
            if "max_rel_error" in r and not r.get("bit_exact")
            else ""  # bit-exact, or no resident row in the run to compare with
        )
        for r in rows
        if r.get("coded_ratio") is not None
    ]
    notes += [
        f"- {r['strategy']}: undo left devices {r['devices_after_undo']}, {r['hooks_after_undo']} hooks, "
        f"weights intact {r['weights_intact_after_undo']}"
        for r in rows
        if r.get("restored") is False
    ]
    return "\n".join(lines + ([""] + ["Notes:"] + notes if notes else [])) + "\n"


def progress_line(i: int, n: int, row: dict) -> str:
    head = f"[{i}/{n}] {row['strategy']}:"
    if row.get("error"):
        return f"{head} ERROR in {row.get('failed_in')}: {row['error']}"
    rss = f"{fmt(row.get('rss_after_setup_bytes'), '.1f', GB)}/{fmt(row.get('rss_peak_bytes'), '.1f', GB)}"
    return (
        f"{head} step {fmt(row['step_s'])} s (min {fmt(row['step_min_s'])}), x floor {fmt(row['x_floor'], '.2f')}, "
        f"setup {fmt(row['setup_s'], '.2f')} s, peak GPU {fmt(row['peak_gpu_alloc_bytes'], '.1f', GB)} GB, "
        f"RSS {rss} GB, bit-exact {row['bit_exact']}, restored {row.get('restored')}, build {row['build_s']:.1f} s"
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="flux-12b | sd35-medium | tiny-flux | path/to/config.json")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES, help="comma-separated; default: %(default)s")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards first (auto-* calibrates on its second)")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--cpu-smoke", action="store_true", help="run on CPU (checks the script, no timings)")
    p.add_argument("--grad-mode", choices=("inference", "no_grad"), default="inference")
    p.add_argument(
        "--retry-no-grad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rerun a strategy under no_grad when its forward fails under inference_mode",
    )
    p.add_argument(
        "--layerwise-via",
        choices=("model", "pipeline"),
        default="model",
        help="pass the transformer itself to dispatch_pipeline, or a holder with .transformer",
    )
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: model's)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default: flux 512, sd3 333)")
    p.add_argument("--before", default=None, help="folder holding an earlier offload_map package (before-* strategies)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-std", type=float, default=0.02)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def make_ctx(args: argparse.Namespace) -> Ctx:
    if args.cpu_smoke:
        device = "cpu"
    elif torch.cuda.is_available():
        device = args.device
    else:
        sys.exit("CUDA is not available; use --cpu-smoke --model tiny-flux to check the script on CPU")
    spec = models.resolve_spec(args.model, args.resolution, args.text_len)
    if spec.family is None:
        sys.exit(f"no input recipe for {spec.class_name}; supported: {sorted(models.FAMILY_BY_CLASS)}")
    return Ctx(args=args, spec=spec, device=device)


def strategy_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        strategy_setup(name)  # fail fast on a typo
    if "resident" in names and names[0] != "resident":
        print("note: running resident first (it gives the reference output)", flush=True)
        names = ["resident"] + [n for n in names if n != "resident"]
    return names


def main(argv=None) -> None:
    args = parse_args(argv)
    ctx = make_ctx(args)
    names = strategy_list(args.strategies)
    if REPO_ROOT not in sys.path:
        sys.path.append(REPO_ROOT)  # offload_map from this checkout unless it is installed
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"step_time_{ctx.spec.name}")
    print(f"building {ctx.spec.name} on {ctx.device} ...", flush=True)
    env, spare = prepare(ctx)
    print(
        f"built in {env['build_s']:.1f} s; {env['num_params'] / 1e9:.2f} B params; floor {fmt(env['floor_s'])} s; "
        f"pinned {fmt(env['pinned_Bps'], '.1f', GB)} GB/s",
        flush=True,
    )
    warn_host_memory(env)
    with open(stem + ".jsonl", "w") as f:
        f.write(json.dumps(env) + "\n")
    rows: list[dict] = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        row = run_strategy(name, ctx, spare)
        add_ratios(row, env, rows)
        rows.append(row)
        with open(stem + ".jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(stem + ".md", "w") as f:
            f.write(render_markdown(env, rows))
        print(progress_line(i, len(names), row), flush=True)
    print("\n" + render_markdown(env, rows), flush=True)


if __name__ == "__main__":
    main()
