"""``dispatch_pipeline``: the flow of one dispatch, each stage run once.

pipeline -> collect (``ModuleDiscovery.discover``, ``collect_tensors``) -> device map (``compile_found``, or the
user's map) -> plan (``bind``) -> runtime (``Runtime``), with ``auto.AutoPlanner`` re-planning under a budget.
The ``OffloadHandle`` it returns holds the result and the way back.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import torch

from .auto import AutoPlanner
from .collect.components import PipelineModules, discover_components
from .collect.tensors import collect_tensors
from .handle import HANDLE_ATTR, OffloadHandle
from .loading.weights import WeightSource
from .mapping.compiler import STREAM_MIN_BYTES, check_strategy, compile_found
from .mapping.device_map import DeviceMap, check_compression, check_window
from .mapping.devices import resolve_device
from .mapping.ownership import within
from .mapping.sizes import device_budget, human_bytes
from .planning.bind import bind
from .runtime.bandwidth import bandwidth
from .runtime.hooks import BlockHook, ComponentHook
from .runtime.runtime import Runtime

logger = logging.getLogger("offload_map")

__all__ = ["OffloadHandle", "dispatch_pipeline"]


def dispatch_pipeline(
    pipeline: object,
    strategy: str | None = None,
    device: "str | torch.device | None" = None,
    *,
    window: int | None = None,
    device_map: DeviceMap | None = None,
    max_memory: dict | None = None,
    gpu_budget: "str | int | None" = None,
    weights: "dict | str | os.PathLike | None" = None,
    share_host_copy: bool | None = None,
    shard_copies: bool = False,
    pin_memory: bool = True,
    blocking: bool = False,
    progress: bool | None = None,
    runs_per_call: dict[str, int] | None = None,
    compression: "str | dict[str, str] | None" = None,
    offload_folder: "str | os.PathLike | None" = None,
) -> OffloadHandle:
    """Place ``pipeline``'s modules by strategy (or by an explicit device map) and hook them to run there.

    Args:
        pipeline: a diffusers ``DiffusionPipeline``, any object holding ``nn.Module``s, or an ``nn.Module``
            (a lone DiT is fine).
        strategy: ``"model"`` (the default: components take turns on the device), ``"none"`` (all resident),
            ``"layerwise"`` (DiT blocks, and those of encoders of 1 GiB or more, streamed through ``window``
            device slots, the rest of such a component on the device only while it runs; smaller components
            take turns) or ``"auto"`` (the fastest predicted map within a
            budget, re-planned after each streamed component's first forwards). Not with ``device_map``.
        device: target device; ``None`` picks this rank's GPU (``LOCAL_RANK``), or the CPU without one. With
            ``device_map``, the map runs on ``device`` instead of the one it names. On the CPU the same code
            runs with synchronous copies.
        window: device slots per streamed component, an int >= 1 (default 2: one computing, one loading). With
            ``device_map``, it replaces the map's window.
        device_map: a map from ``compile_device_map`` (possibly edited, or loaded from JSON) to use instead of a
            strategy; the map you pass is not changed.
        max_memory: accelerate's convention, ``{0: "12GiB"}``: the device memory the map may use. With
            ``"layerwise"`` or ``"auto"`` the planner keeps as many blocks resident as pays within it.
        gpu_budget: shorthand for ``max_memory={<this device>: gpu_budget}``.
        weights: ``{component: path}`` for components built on the meta device (``empty_model``): each
            tensor is read from the safetensors checkpoint at ``path`` (a model directory or a file) straight
            into its pinned host buffer or onto the device, with no full CPU copy first. One path will do
            for a lone DiT. ``remove()`` leaves these weights on the CPU.
        share_host_copy: under ``accelerate launch``/torchrun, keep one host copy of the offloaded weights
            for all ranks of a host (``shared_host``). ``None`` (default): share when several ranks of one host
            dispatch the same model; ``False``: every rank packs its own. The call is then collective: every
            rank must dispatch.
        shard_copies: under ``accelerate launch``/torchrun, each rank of a host copies one N-th of every streamed
            block over its own link and the ranks all-gather the rest (``sharded_copy``): N links at once. The
            ranks must then run the same steps in lockstep (data parallel, same shapes); a rank that stops makes
            the others fail within a minute instead of hanging.
        pin_memory: keep host copies in page-locked memory (fast, asynchronous copies). CUDA only.
        blocking: make component copies synchronous (for HSDP, where collectives read the weights at once).
        progress: show a progress bar while packing host weights (default: when it takes over a second).
        runs_per_call: with a budget, how often each component runs in one call of the pipeline, e.g.
            ``{"transformer": 50}`` for 50 steps (default: each DiT ``auto.DEFAULT_DIT_RUNS`` times, every other
            component once). The planner weighs a DiT's step time by it against copies made once per call.
        compression: ``"lossless"``: keep every streamed block coded in host memory too, in about 0.71 of its bytes
            for bf16 weights (0.88 for fp16), copy it so and decode it on the device (``runtime.codec``): fewer
            bytes cross the link, outputs stay bit-identical. Blocks that do not compress (float32) stream as they
            are. Host memory holds the raw bytes beside the code, except for blocks
            whose weights view their files (``from_pretrained`` leaves them so; ``weights`` reads them so where the
            checkpoint stores them as laid out): those hold only their code, and between uses their tensors view
            the file, copy-on-write (``runtime.mapped_host``). ``"fp8"`` (lossy,
            never the default): the streamed blocks' linear weights cross the link in float8 e4m3 with a scale per
            output channel (about half their bytes) and are upcast on the device; outputs differ from the resident
            run. A dict chooses per
            component, block or block list (the longest path holding a block wins; None: as it is), e.g.
            ``{"transformer": "lossless", "transformer.single_transformer_blocks.37": None}``. Default: the map's
            (``None`` for a strategy); ``{}`` or a dict of nothing but None streams every block as it is, over the
            map's compression too. Not with ``shard_copies`` or a host copy shared between ranks.
        offload_folder: with ``compression="lossless"``, a folder on disk (created if missing) where blocks built
            in memory (random weights, a dtype changed on load: a float32 checkpoint read as bf16) keep their raw
            bytes: written there once, and between uses their tensors view that file, copy-on-write, as blocks
            loaded by ``from_pretrained`` view theirs. Host memory then holds only their code, about 0.71 of their
            bytes, instead of 1.71 times them; dispatch writes their bytes to disk once. The files have no name
            (nothing is left behind) and take their disk space until ``remove()``. If a write fails (a full disk),
            the blocks after it keep their raw bytes in memory, with a warning; a folder on a filesystem held in
            memory (tmpfs, as ``/tmp`` is on many machines) saves nothing, and dispatch says so.

    Returns:
        An ``OffloadHandle``; ``handle.remove()`` restores the pipeline.

    Raises:
        ValueError: unknown strategy, bad window, device or budget, a device map that does not fit the pipeline.
        CheckpointError: (a ValueError) a checkpoint in ``weights`` is missing, pickle-based, corrupt, truncated
            or does not match its component, or a meta component has none. Nothing is allocated.
        BudgetTooSmall: (a ValueError) the budget is below the minimum, which the message names.
        ValueError: ``offload_folder`` without lossless compression, or not a writable folder.
        RuntimeError: the pipeline is already dispatched, or another offloader's hooks are on it.

    Example:
        >>> from offload_map import dispatch_pipeline
        >>> from offload_map.demo import make_tiny_pipeline
        >>> pipe = make_tiny_pipeline()
        >>> handle = dispatch_pipeline(pipe, strategy="layerwise", device="cpu", window=2)
        >>> image = pipe("a cat", steps=2)
        >>> handle.remove()
    """
    start = time.perf_counter()
    found = discover_components(pipeline)
    if device_map is None:
        strategy = check_strategy("model" if strategy is None else strategy)
        window = check_window(2 if window is None else window)
    elif strategy is not None:
        raise ValueError(
            f"strategy={strategy!r} and device_map= were both given: the map holds every placement; "
            "pass one of them (to compile a map for a strategy: compile_device_map(pipe, strategy))"
        )
    elif window is not None:
        check_window(window)
    override = compression is not None  # {} or {path: None, ...} clear a map's compression
    compression = check_compression(compression)
    target = resolve_device(device if device is not None or device_map is None else device_map.device)
    budget = device_budget(target, max_memory, gpu_budget)
    if budget is not None and (device_map is not None or strategy not in ("layerwise", "auto")):
        raise ValueError("a memory budget (max_memory/gpu_budget) applies to strategy 'layerwise' or 'auto' only")
    _check_not_managed(pipeline, found)
    _check_runs(runs_per_call, found)
    tensors = collect_tensors(found)
    if device_map is None:
        device_map = compile_found(found, tensors, strategy, str(target), window, budget, compression)
    else:  # validated as a loaded map is; the user's object is never changed
        device_map = DeviceMap.from_dict(device_map.to_dict())
        device_map.device = str(target)
        if window is not None:
            device_map.window = window
        if override:
            device_map.compression = check_compression(compression, device_map.components)
    if device_map.compression is not None:
        if shard_copies or share_host_copy:
            raise ValueError(
                f"compression={device_map.compression!r} keeps a coded copy per rank: it does not combine with "
                "shard_copies=True or share_host_copy=True; pass one of them"
            )
        share_host_copy = False  # each rank codes its own
    folder = _offload_folder(offload_folder, device_map.compression)
    options = dict(
        budget=budget,
        offload_folder=folder,
        pin_memory=pin_memory,
        blocking=blocking,
        progress=progress,
        share_host_copy=share_host_copy,
        shard_copies=shard_copies,
        runs_per_call=runs_per_call,
    )

    def rebuild(dmap: DeviceMap):
        # After refresh() restored a pipeline whose modules changed: collect it anew, same map, sizes re-read.
        found = discover_components(pipeline)
        dmap = dmap.copy()
        dmap.entries = {path: replace(entry, nbytes=0) for path, entry in dmap.entries.items()}
        return _build(pipeline, found, collect_tensors(found), dmap, None, **options)

    device_map, runtime, planner = _build(pipeline, found, tensors, device_map, weights, **options)
    try:
        handle = OffloadHandle(pipeline, device_map, runtime, time.perf_counter() - start, planner, rebuild)
        pipeline.__dict__[HANDLE_ATTR] = handle
    except BaseException:
        runtime.restore()
        raise
    logger.info("dispatched %s: %s", type(pipeline).__name__, device_map.strategy)
    return handle


def _offload_folder(folder: "str | os.PathLike | None", compression) -> Path | None:
    """``offload_folder`` checked: a writable folder (created if missing) for a dispatch that codes losslessly."""
    if folder is None:
        return None
    kinds = {compression} if isinstance(compression, str) else set((compression or {}).values())
    if "lossless" not in kinds:
        raise ValueError(
            f"offload_folder={str(folder)!r} keeps the raw bytes of blocks coded losslessly, but this dispatch codes "
            f"none (compression={compression!r}); pass compression='lossless' too, or leave offload_folder out"
        )
    path = Path(folder).resolve()  # a refresh() that dispatches again may run from another working directory
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"offload_folder={str(folder)!r} cannot be created ({err}); pass a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"offload_folder={str(folder)!r} is not writable; pass a folder you can write to")
    kind = _filesystem(path)
    if kind in ("tmpfs", "ramfs"):
        logger.warning(
            "offload_folder=%r is on %s, which holds its files in memory: host memory will not shrink; pass a folder on disk",
            str(folder),
            kind,
        )
    return path


def _filesystem(path: Path) -> str | None:
    """The type of the filesystem holding ``path`` (already resolved: mount points are; ``/proc/self/mounts``, the
    longest mount point above it), or None."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = -1, None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))  # a space is \040
        if (path == point or point in path.parents) and len(point.parts) > best:
            best, kind = len(point.parts), fields[2]
    return kind


def _idle_compression(dmap: DeviceMap, plan) -> list[str]:
    """The paths ``dmap.compression`` gives a kind that hold no block the plan streams (``[""]`` for one kind)."""
    if not dmap.compression:
        return []
    streamed = [block.path for ring in plan.rings for block in ring.blocks]
    named = {"": dmap.compression} if isinstance(dmap.compression, str) else dmap.compression
    return [path for path, kind in named.items() if kind and not any(within(b, path) for b in streamed)]


def _build(
    pipeline: object,
    found: PipelineModules,
    tensors,
    dmap: DeviceMap,
    weights,
    *,
    budget: int | None,
    pin_memory: bool,
    blocking: bool,
    progress: bool | None,
    share_host_copy: bool | None,
    shard_copies: bool,
    runs_per_call: dict | None,
    offload_folder: Path | None,
) -> tuple[DeviceMap, Runtime, AutoPlanner | None]:
    plan = bind(dmap, found, tensors)
    idle = _idle_compression(dmap, plan)
    if idle:
        what = (
            f"compression={dmap.compression!r}: no block streams"
            if isinstance(dmap.compression, str)
            else f"compression names {', '.join(map(repr, idle))}, but no block of {'theirs' if len(idle) > 1 else 'its'} streams"
        )
        logger.warning(
            "%s under this map (strategy %r), so it is not coded. 'layerwise' and budgets stream every DiT and the "
            "components of %s or more with block lists (others move whole); to stream another component's blocks, "
            "place them 'layer-window' in the map",
            what,
            dmap.strategy,
            human_bytes(STREAM_MIN_BYTES),
        )
    dmap = dmap.sized({path: unit.tensors for path, unit in plan.units.items()})
    source = WeightSource(plan, weights)
    link = bandwidth(plan.device) if budget is not None and plan.rings else None
    runtime = Runtime(
        plan,
        pin_memory=pin_memory,
        blocking=blocking,
        progress=progress,
        source=source or None,
        share_host_copy=share_host_copy,
        shard_copies=shard_copies,
        offload_folder=offload_folder,
    )
    blocks, raw = runtime.raw_beside_code
    if blocks and offload_folder is None:  # with one, a failed write said so already
        logger.warning(
            "compression='lossless': %d coded blocks (%s) were built in memory rather than read from a checkpoint "
            "file, so host memory holds their raw bytes beside their code (about 1.71x those bytes instead of 0.71x). "
            "Blocks loaded with from_pretrained, or by empty_model(...) and weights=, from a checkpoint that stores "
            "them in this dtype are held only as their code, and so are these with offload_folder=, which keeps "
            "their raw bytes on disk",
            blocks,
            human_bytes(raw),
        )
    try:
        planner = None if link is None else AutoPlanner(runtime, plan, dmap, budget, link, runs_per_call)
    except BaseException:
        runtime.restore()  # no handle exists yet to undo it
        raise
    return dmap, runtime, planner


def _check_runs(runs_per_call: object, found: PipelineModules) -> None:
    if runs_per_call is None:
        return
    if not isinstance(runs_per_call, dict):
        raise ValueError(
            f"runs_per_call must be a dict {{component: runs}}, e.g. {{'transformer': 50}}, got {runs_per_call!r:.60}"
        )
    for name, runs in runs_per_call.items():
        if name not in found.components:
            raise ValueError(f"runs_per_call names {name!r}, which is not a component of the pipeline {sorted(found.components)}")
        if type(runs) is not int or runs < 1:
            raise ValueError(f"runs_per_call[{name!r}] must be an int >= 1 (forwards per call), got {runs!r:.40}")


def _check_not_managed(pipeline: object, found: PipelineModules) -> None:
    existing = getattr(pipeline, HANDLE_ATTR, None)
    if existing is not None:
        raise RuntimeError(
            f"this {type(pipeline).__name__} is already dispatched ({existing!r}); call remove() on the handle "
            f"dispatch_pipeline returned (also at pipe.{HANDLE_ATTR}) before dispatching again"
        )
    for comp in found.components.values():
        for path, module in comp.module.named_modules():
            where = f"{comp.name}.{path}".strip(".") or type(pipeline).__name__
            if isinstance(getattr(module, "_hf_hook", None), (ComponentHook, BlockHook)):
                raise RuntimeError(
                    f"{where} is already dispatched by offload_map as part of another pipeline (its hook is a "
                    f"{type(module._hf_hook).__name__}); call remove() on that dispatch's handle first"
                )
            if hasattr(module, "_hf_hook"):
                raise RuntimeError(
                    f"{where} already carries an accelerate hook ({type(module._hf_hook).__name__}), e.g. from "
                    "enable_model_cpu_offload/enable_sequential_cpu_offload or cpu_offload; remove it first "
                    "(pipe.remove_all_hooks() or accelerate.hooks.remove_hook_from_module(m, recurse=True))"
                )
            registry = getattr(module, "_diffusers_hook", None)
            names = [n for n in getattr(registry, "hooks", {}) if "offload" in n]
            if names:
                raise RuntimeError(
                    f"{where} is managed by diffusers' {names[0]} hook (enable_group_offload?); remove it first "
                    "(e.g. rebuild the pipeline, or remove the hooks from the module's _diffusers_hook registry)"
                )
