"""``dispatch_pipeline``: compile, bind and run a pipeline under a device map, and undo it."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

import torch
from .auto import AutoPlanner
from .budget import device_budget
from .compiler import check_strategy, compile_device_map, with_sizes
from .device_map import DeviceMap, check_window
from .devices import resolve_device
from .module_collector import ModuleDiscovery
from .plan import bind
from .profile import bandwidth
from .report import Report
from .runtime import Runtime
from .weights import WeightSource

logger = logging.getLogger("offload_map")

_HANDLE_ATTR = "_offload_map_handle"


class OffloadHandle:
    """A dispatched pipeline: its device map, a report, and the way back.

    Attributes:
        device_map: the ``DeviceMap`` in force.
        pipeline: the dispatched pipeline.
    """

    def __init__(self, pipeline: object, device_map: DeviceMap, runtime: Runtime, setup_seconds: float,
                 planner: AutoPlanner | None = None, rebuild=None) -> None:
        self.pipeline = pipeline
        self.device_map = device_map
        self._runtime = runtime
        self._planner = planner
        self._rebuild = rebuild
        self._report = self._start_report(setup_seconds)
        self._removed = False
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)

    def report(self) -> Report:
        """Placement totals, transfers since dispatch, and peak device memory allocated since dispatch (with a
        budget, since the calibration forward, which resets the allocator's peak counter once)."""
        if not self._removed:  # a budget's plan may have changed placements since dispatch
            self._report.bytes_by_placement = self.device_map.bytes_by_placement()
            self._report.slot_bytes = self._runtime.slot_bytes
            if self._runtime.device.type == "cuda":
                self._report.peak_device_bytes = torch.cuda.max_memory_allocated(self._runtime.device)
        return self._report

    @property
    def plans(self) -> dict:
        """The planner's ``BlockPlan`` per streamed DiT (with a budget), once that DiT's second forward ran (the timed one)."""
        return dict(self._planner.plans) if self._planner is not None else {}

    def explain(self) -> str:
        """The device map, and for each planned DiT its per-block plan and what bounds the step."""
        parts = [str(self.device_map)]
        if self._planner is None:
            if self.device_map.strategy == "auto":
                parts.append("The whole pipeline fits the budget: everything is resident ('gpu').")
            return "\n\n".join(parts)
        for ring in self._runtime.plan.rings:
            plan = self._planner.plans.get(ring.component)
            title = f"plan for {ring.component or 'the DiT'}"
            parts.append(f"{title}:\n{plan.explain()}" if plan else f"{title}: not measured yet; its second forward times every block, then the plan is made")
        return "\n\n".join(parts)

    def refresh(self) -> None:
        """Call after changing the weights while dispatched.

        - In place (``load_state_dict``, ``fuse_lora``/``unfuse_lora``, edits): weights of streamed blocks and
          pinned components that sit on the device were changed there only; they are copied into the host
          storage, so every later load brings the new values.
        - New or removed modules (``load_lora_weights``, ``add_adapter``, ``unload_lora_weights``,
          ``delete_adapters``): the pipeline is put back and dispatched again under the same device map
          (placements, window, budget), so the new tensors get their host buffers. Until then its forwards
          are refused with a message pointing here. With a host copy shared between ranks this is collective:
          every rank changes its modules and calls ``refresh()``. If dispatching again fails, the pipeline is
          left as ``remove()`` leaves it and the error is raised.

        Raises:
            ValueError: a tensor changed shape or dtype in place (remove and dispatch again).
        """
        if self._removed:
            raise RuntimeError("this dispatch was already removed; the pipeline is back as it was")
        if self._runtime.modules_changed():
            self._runtime.restore()
            for path, entry in self.device_map.entries.items():  # sizes are re-read from the changed modules
                self.device_map.entries[path] = replace(entry, nbytes=0)
            try:
                with_sizes(self.device_map, self.pipeline)
                self._runtime, self._planner = self._rebuild()
            except BaseException:
                self._removed = True  # restored and not dispatched again: the pipeline is as remove() leaves it
                self.pipeline.__dict__.pop(_HANDLE_ATTR, None)
                raise
            self._report = self._start_report(self._report.setup_seconds)
        else:
            self._runtime.refresh()

    def _start_report(self, setup_seconds: float) -> Report:
        runtime = self._runtime
        return Report.start(self.device_map, runtime.slot_bytes, setup_seconds, runtime.stats, runtime.setup_times)

    @property
    def host_copy(self):
        """The ``shared_host.HostCopy`` this rank streams from when ranks share one (``None`` when it packs its own):
        ``host_copy.ranks`` share it, ``host_copy.creator`` says whether this rank filled it."""
        return self._runtime.host_copy

    def on_device(self) -> list[str]:
        """Names of the components whose weights are on the target device right now (resident or loaded).

        A streamed DiT counts as on the device: its non-block modules are resident.
        """
        runtime = self._runtime
        return [
            c.name for c in runtime.plan.components
            if c.name not in runtime.pinned or runtime.pinned[c.name].loaded
        ]

    def _finish(self, undo) -> None:
        if self._removed:
            raise RuntimeError("this dispatch was already removed; the pipeline is back as it was")
        undo()
        self._removed = True
        self.pipeline.__dict__.pop(_HANDLE_ATTR, None)

    def remove(self) -> None:
        """Put the pipeline back as it was: hooks gone, every tensor on its original device, bit-identical.

        Raises:
            RuntimeError: called a second time.
        """
        self._finish(self._runtime.restore)

    def detach(self) -> None:
        """Remove the hooks; streamed blocks point at their host buffers, every other tensor stays where it is
        now (a pinned component that is loaded stays on the device). Unlike ``remove()``, nothing goes back
        to its original device; slots are freed with the handle."""
        self._finish(self._runtime.detach)

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"<OffloadHandle {self.device_map.strategy} -> {self.device_map.device} ({state})>"


def dispatch_pipeline(
    pipeline: object,
    strategy: str = "model",
    device: "str | torch.device | None" = None,
    *,
    window: int = 2,
    device_map: DeviceMap | None = None,
    max_memory: dict | None = None,
    gpu_budget: "str | int | None" = None,
    weights: "dict | str | os.PathLike | None" = None,
    share_host_copy: bool | None = None,
    shard_copies: bool = False,
    pin_memory: bool = True,
    blocking: bool = False,
    progress: bool | None = None,
) -> OffloadHandle:
    """Place ``pipeline``'s modules by strategy (or by an explicit device map) and hook them to run there.

    Args:
        pipeline: a diffusers ``DiffusionPipeline``, any object holding ``nn.Module``s, or an ``nn.Module``
            (a lone DiT is fine).
        strategy: ``"none"`` (all resident), ``"model"`` (components take turns on the device),
            ``"layerwise"`` (DiT blocks streamed through ``window`` device slots; encoders take turns) or
            ``"auto"`` (the fastest predicted map within a budget, re-planned after the first DiT forward).
            Ignored when ``device_map`` is given.
        device: target device; ``None`` picks this rank's GPU (``LOCAL_RANK``), or the CPU without one.
            On the CPU the same code runs with synchronous copies.
        window: device slots per streamed DiT, an int >= 1 (default 2: one computing, one loading).
        device_map: a map from ``compile_device_map`` (possibly edited, or loaded from JSON) to use instead.
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

    Returns:
        An ``OffloadHandle``; ``handle.remove()`` restores the pipeline.

    Raises:
        ValueError: unknown strategy, bad window, device or budget, a device map that does not fit the pipeline.
        CheckpointError: (a ValueError) a checkpoint in ``weights`` is missing, pickle-based, corrupt, truncated
            or does not match its component, or a meta component has none. Nothing is allocated.
        BudgetTooSmall: (a ValueError) the budget is below the minimum, which the message names.
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
    if device_map is None:
        strategy = check_strategy(strategy)
        check_window(window)
    target = resolve_device(device if device_map is None else device_map.device)
    budget = device_budget(target, max_memory, gpu_budget)
    if budget is not None and (device_map is not None or strategy not in ("layerwise", "auto")):
        raise ValueError("a memory budget (max_memory/gpu_budget) applies to strategy 'layerwise' or 'auto' only")
    _check_not_managed(pipeline)
    if device_map is None:
        device_map = compile_device_map(pipeline, strategy, target, window, budget)
    else:
        device_map = with_sizes(DeviceMap.from_dict(device_map.to_dict()), pipeline)

    def build(weights=None):
        plan = bind(device_map, pipeline)
        source = WeightSource(plan, weights)
        runtime = Runtime(plan, pin_memory=pin_memory, blocking=blocking, progress=progress,
                          source=source or None, share_host_copy=share_host_copy, shard_copies=shard_copies)
        planner = AutoPlanner(runtime, plan, device_map, budget, bandwidth(target)) if budget is not None and plan.rings else None
        return runtime, planner

    runtime, planner = build(weights)
    handle = OffloadHandle(pipeline, device_map, runtime, time.perf_counter() - start, planner, rebuild=build)
    pipeline.__dict__[_HANDLE_ATTR] = handle
    logger.info("dispatched %s: %s", type(pipeline).__name__, device_map.strategy)
    return handle


def _check_not_managed(pipeline: object) -> None:
    existing = getattr(pipeline, _HANDLE_ATTR, None)
    if existing is not None:
        raise RuntimeError(
            f"this {type(pipeline).__name__} is already dispatched ({existing!r}); call remove() on the handle "
            f"dispatch_pipeline returned (also at pipe.{_HANDLE_ATTR}) before dispatching again"
        )
    for comp in ModuleDiscovery.discover(pipeline).components.values():
        for path, module in comp.module.named_modules():
            where = f"{comp.name}.{path}".strip(".") or type(pipeline).__name__
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

