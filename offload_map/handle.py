"""``OffloadHandle``: a dispatched pipeline's device map, its report, and the way back."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .auto import AutoPlanner
from .mapping.device_map import DeviceMap
from .mapping.sizes import human_bytes
from .runtime.report import Report
from .runtime.runtime import Runtime

HANDLE_ATTR = "_offload_map_handle"


class OffloadHandle:
    """A dispatched pipeline: its device map, a report, and the way back (``dispatch_pipeline`` returns it).

    Attributes:
        pipeline: the dispatched pipeline.
    """

    def __init__(
        self,
        pipeline: object,
        device_map: DeviceMap,
        runtime: Runtime,
        setup_seconds: float,
        planner: AutoPlanner | None,
        rebuild: Callable[[DeviceMap], tuple[DeviceMap, Runtime, AutoPlanner | None]],
    ) -> None:
        self.pipeline = pipeline
        self._map = device_map
        self._runtime = runtime
        self._planner = planner
        self._rebuild = rebuild
        self._report = self._start_report(setup_seconds)
        self._removed = False
        self._ended_by = "remove"  # or "detach": what ended the dispatch, for the error a later call raises
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)

    @property
    def device_map(self) -> DeviceMap:
        """The ``DeviceMap`` in force. With a budget, the planner's choices replace it with a new map once the
        calibration forward ran; a map read from here earlier is never changed behind your back."""
        return self._planner.device_map if self._planner is not None else self._map

    @property
    def runtime(self) -> Runtime:
        """The live runtime (advanced: its rings, host buffers and ``set_residency``); see ``offload_map.runtime``."""
        self._check_active()
        return self._runtime

    def report(self) -> Report:
        """Placement totals, transfers since dispatch, and peak device memory allocated since dispatch (with a
        budget, since the calibration forward, which resets the allocator's peak counter once)."""
        if not self._removed:  # a budget's plan may have changed placements since dispatch
            self._report.bytes_by_placement = self.device_map.bytes_by_placement()
            self._report.slot_bytes = self._runtime.slot_bytes
            self._report.coded = self._runtime.coded
            self._report.host_bytes = self._runtime.host_bytes
            if self._runtime.device.type == "cuda":
                self._report.peak_device_bytes = torch.cuda.max_memory_allocated(self._runtime.device)
        return self._report

    @property
    def plans(self) -> dict:
        """The planner's ``BlockPlan`` per streamed DiT (with a budget), once that DiT's second forward ran (the timed one)."""
        return dict(self._planner.plans) if self._planner is not None else {}

    @property
    def predicted_call_s(self) -> float | None:
        """With a budget, once a component was planned: the planner's predicted seconds of one pipeline call spent in the
        components it planned (``explain()`` lists them and those not counted), to set beside a measured call.
        None before any plan, and without a budget."""
        return self._planner.predicted_call_s if self._planner is not None and self._planner.plans else None

    def explain(self) -> str:
        """The device map, and for each planned DiT its per-block plan and what bounds the step."""
        parts = [str(self.device_map)]
        coded = None if self._removed else self._runtime.coded
        if coded is not None:
            staging = sum(ring.staging_device_bytes for ring in self._runtime.rings.values())
            parts.append(
                f"coded blocks: {coded}; their staging buffers take {human_bytes(staging)} of the device while their "
                "component runs (out of each plan's budget). Plans count raw bytes, at the rate the coded copies and "
                "their decodes reach (the link's rate over the code's share of the bytes, or the timed forward's if lower)."
            )
        if self._planner is None:
            if self.device_map.strategy == "auto":
                parts.append("The whole pipeline fits the budget: everything is resident ('gpu').")
            return "\n\n".join(parts)
        for ring in self._runtime.plan.rings:
            plan = self._planner.plans.get(ring.component)
            title = f"plan for {ring.component or 'the DiT'}"
            parts.append(
                f"{title}:\n{plan.explain()}"
                if plan
                else f"{title}: not measured yet; its second forward times every block, then the plan is made"
            )
        if self._planner.plans:
            parts.append(f"per call:\n{self._planner.summary()}")
        return "\n\n".join(parts)

    def refresh(self) -> None:
        """Call after changing the weights while dispatched.

        - In place (``load_state_dict``, ``fuse_lora``/``unfuse_lora``, edits): streamed blocks and components
          that are not on the device were changed in their host buffers; those on the device (pinned components
          loaded, kept block parts) are copied back into the host buffers. Blocks already prefetched for the next
          step are loaded again, so every later forward computes with the new values.
        - New, removed or replaced modules or Parameters (``load_lora_weights``, ``add_adapter``,
          ``unload_lora_weights``, ``delete_adapters``, ``module.weight = nn.Parameter(...)``): the pipeline is
          put back and dispatched again under the map it was dispatched with (placements, window; a budget is
          planned again from new measurements, as a budget's plan decides what leaves the device between phases,
          which a map cannot say), so the new tensors get their host buffers. Until then its forwards are refused
          with a message pointing here. With a host copy shared between ranks this is collective: every rank
          changes its modules and calls ``refresh()``. If dispatching again fails, the pipeline is left as
          ``remove()`` leaves it and the error is raised. After a ``remove()`` or ``refresh()`` that was
          interrupted while putting the pipeline back, it finishes that and dispatches again.

        Raises:
            ValueError: a tensor changed shape or dtype in place (remove and dispatch again).
        """
        self._check_active()
        # A restore interrupted before (remove()'s or refresh()'s) took the guards off that would show the change:
        # finish it, and dispatch again.
        if not self._runtime.restoring and not self._runtime.modules_changed():
            self._runtime.refresh()
            if self._planner is not None:
                self._planner.restage()
            return
        # A map edited in place (``device_map`` is the handle's own) is checked before anything is undone.
        DeviceMap.from_dict(self._map.to_dict())
        self._runtime.restore()
        try:
            self._map, self._runtime, self._planner = self._rebuild(self._map)
        except BaseException:
            self._removed = True  # restored and not dispatched again: the pipeline is as remove() leaves it
            self.pipeline.__dict__.pop(HANDLE_ATTR, None)
            raise
        self._report = self._start_report(self._report.setup_seconds)

    def _start_report(self, setup_seconds: float) -> Report:
        runtime = self._runtime
        return Report.start(self.device_map, runtime.slot_bytes, setup_seconds, runtime.stats, runtime.setup_times)

    @property
    def host_copy(self):
        """The ``shared_host.HostCopy`` this rank streams from when ranks share one (``None`` when it packs its own):
        ``host_copy.ranks`` share it, ``host_copy.creator`` says whether this rank filled it."""
        return self._runtime.host_copy

    def on_device(self) -> list[str]:
        """Names of the components whose weights are on the target device right now: resident, pinned and loaded,
        or streamed and active (their slots, kept parts and weights outside the blocks on the device)."""
        return self._runtime.on_device()

    def _check_active(self) -> None:
        if self._removed and self._ended_by == "detach":
            raise RuntimeError(
                "this dispatch was detached: its hooks are gone and every tensor stays where detach() left it; "
                "dispatch the pipeline again to offload it"
            )
        if self._removed:
            raise RuntimeError("this dispatch was already removed; the pipeline is back as it was")

    def _finish(self, undo, ended_by: str) -> None:
        self._check_active()
        self._report.coded = self._runtime.coded  # what report() says once the runtime is gone
        self._report.host_bytes = self._runtime.host_bytes
        undo()
        self._removed, self._ended_by = True, ended_by
        self.pipeline.__dict__.pop(HANDLE_ATTR, None)

    def remove(self) -> None:
        """Put the pipeline back as it was: hooks gone, every tensor on its original device, bit-identical, with
        the edits made while dispatched (kept parts on the device included). A tensor that viewed its file before
        dispatch (``from_pretrained``'s) and was held only as its code views it again; every other one gets memory
        of its own. After an interrupt (Ctrl-C) while it runs, call it again: it finishes.

        Raises:
            RuntimeError: called a second time.
        """
        self._finish(self._runtime.restore, "remove")

    def detach(self) -> None:
        """Remove the hooks; streamed blocks point at their host buffers (those held only coded at their checkpoint
        files or at files of the ``offload_folder``, ``runtime.mapped_host``: such a file keeps its disk space while
        the model lives), every other tensor stays where it is now (a pinned component that is loaded stays on the
        device). Unlike ``remove()``, nothing goes back to its original device; slots are freed."""
        self._finish(self._runtime.detach, "detach")

    def __repr__(self) -> str:
        state = ("removed" if self._ended_by == "remove" else "detached") if self._removed else "active"
        return f"<OffloadHandle {self.device_map.strategy} -> {self.device_map.device} ({state})>"
