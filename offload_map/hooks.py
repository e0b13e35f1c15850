"""accelerate ``ModelHook``s that drive the runtime, and attaching them so that removal leaves no trace.

- ``ComponentHook`` sits on every component. It exposes ``execution_device`` (diffusers pipelines read it
  to place latents), moves tensor inputs there, makes room for the component (``Swapper.activate``) and,
  on a streamed DiT, tells its prefetchers where each forward begins and ends. diffusers' VAEs call
  ``_hf_hook.pre_forward`` from ``decode``/``encode`` too, so a pinned VAE is loaded for those.
- ``BlockHook`` sits on every streamed block: it asks the prefetcher for the block's slot before the
  block runs and releases it after.

Both stay out of ``torch.compile`` graphs (``torch.compiler.disable``): they move bytes, record events and
rebind parameters, which a graph must not capture. With regional compilation (diffusers'
``compile_repeated_blocks``, before or after dispatch) a block's own forward is compiled and the hooks run
eagerly around it; parameters rebound to another slot keep their shape, dtype and strides, so the compiled
block is reused without recompiling.
"""

from __future__ import annotations

import sys
import threading

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from torch import nn

from .prefetcher import Prefetcher
from .swapper import Swapper


class ComponentHook(ModelHook):
    """Before a component runs: evict what it excludes, load it if pinned, move inputs to its device."""

    def __init__(self, name: str, device: torch.device, swapper: Swapper, prefetchers: list[Prefetcher]) -> None:
        self.name = name
        self.execution_device = device
        self.swapper = swapper
        self.prefetchers = prefetchers

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        self.swapper.activate(self.name)
        for prefetcher in self.prefetchers:
            prefetcher.begin_forward()
        return _to_device(args, self.execution_device), {k: _to_device((v,), self.execution_device)[0] for k, v in kwargs.items()}

    @torch.compiler.disable
    def post_forward(self, module, output):
        for prefetcher in self.prefetchers:
            prefetcher.end_forward()
        return output


class BlockHook(ModelHook):
    """Around a streamed block: take its slot (waiting for its copy on the device), then free it."""

    def __init__(self, prefetcher: Prefetcher, index: int, path: str) -> None:
        self.prefetcher = prefetcher
        self.index = index
        self.path = path
        self._range = None

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{self.path} is streamed through a layer window, which is for inference only: its weights are "
                "overwritten once it ran, so autograd could not use them. Run under torch.no_grad() or "
                "torch.inference_mode() (diffusers pipelines already do)."
            )
        self.prefetcher.enter(self.index)
        self._range = torch.profiler.record_function(f"offload_map::compute {self.path}")
        self._range.__enter__()
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module, output):
        self._range.__exit__(None, None, None)
        self.prefetcher.exit(self.index)
        return output


class ComponentGuard:
    """Refuses a forward of an offloaded component that would compute with the wrong weights:

    - while another thread is inside one: slots, loaded components and the prefetch order serve one forward
      at a time, and two interleaved forwards would compute with each other's weights;
    - after its parameters changed (a LoRA loaded or unloaded through diffusers/peft replaces modules): the
      new tensors are in no host buffer or slot. ``handle.refresh()`` re-packs the pipeline with them.

    Plain torch forward hooks (the post hook with ``always_call``, so a forward that raised still leaves; one
    interrupted by ``KeyboardInterrupt`` skips it, so a thread found holding the guard without being inside the
    module gives it up), attached next to the accelerate hooks; ``remove`` takes them off.
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.tensors = _tensor_names(module)
        self.signature = _signature(module)  # checked every forward: about a millisecond for a 12B DiT
        self.owner: int | None = None
        self.depth = 0
        self._lock = threading.Lock()
        self._handles = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._leave, always_call=True),
        ]

    def changed(self) -> bool:
        """Whether the module's parameters differ from those at dispatch (by count or identity)."""
        return _signature(self.module) != self.signature

    @torch.compiler.disable
    def _enter(self, module, args) -> None:
        if _signature(module) != self.signature:
            now = _tensor_names(module)
            changed = sorted(now - self.tensors) or sorted(self.tensors - now) or ["parameters replaced under their names"]
            raise RuntimeError(
                f"{self.name or type(module).__name__}'s modules changed since dispatch ({len(now - self.tensors)} tensors "
                f"added, {len(self.tensors - now)} removed, e.g. {changed[0]!r}): loading, unloading or deleting a LoRA "
                "replaces modules. Call handle.refresh() (the handle dispatch_pipeline returned, also at "
                "pipe._offload_map_handle) to re-pack the pipeline with them"
            )
        me = threading.get_ident()
        with self._lock:
            if self.owner not in (None, me) and not _running_in(self.owner, module):
                self.owner, self.depth = None, 0  # left by a KeyboardInterrupt, which skips the post hook
            if self.owner not in (None, me):
                raise RuntimeError(
                    f"{self.name or type(module).__name__} is already running on another thread; a dispatched pipeline "
                    "serves one call at a time (its device slots and loaded components are shared). Call it from one "
                    "thread, or serialise the calls with a lock, or dispatch one pipeline per thread"
                )
            self.owner, self.depth = me, self.depth + 1

    @torch.compiler.disable
    def _leave(self, module, args, output) -> None:
        with self._lock:
            if self.owner == threading.get_ident():
                self.depth -= 1
                if not self.depth:
                    self.owner = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _running_in(thread: int, module: nn.Module) -> bool:
    # Only on contention: whether that thread's stack is inside a call of ``module``.
    frame = sys._current_frames().get(thread)
    while frame is not None:
        if frame.f_locals.get("self") is module:
            return True
        frame = frame.f_back
    return False


def _signature(module: nn.Module) -> tuple[int, int]:
    # Parameters only, by count and identity (an adapter swapped for another keeps the count); buffers are
    # left out, since some modules register caches lazily during a forward.
    params = list(module.parameters())
    return len(params), sum(id(p) for p in params)


def _tensor_names(module: nn.Module) -> frozenset[str]:
    return frozenset(n for n, _ in module.named_parameters()) | frozenset(n for n, _ in module.named_buffers())


def _to_device(values: tuple, device: torch.device) -> tuple:
    # Only top-level tensors move: containers keep their identity, since some modules (Wan's VAE decoder
    # caches) mutate list arguments in place and accelerate's send_to_device would hand them copies.
    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in values)


def attach(module: nn.Module, hook: ModelHook) -> None:
    """``add_hook_to_module``, refusing to stack on a hook someone else put there."""
    if hasattr(module, "_hf_hook"):
        raise RuntimeError(f"{type(module).__name__} already has an accelerate hook")
    module.__dict__["_offload_map_had_forward"] = "forward" in module.__dict__
    add_hook_to_module(module, hook)


def detach(module: nn.Module) -> None:
    """Undo ``attach``: accelerate leaves the original bound ``forward`` in the instance dict; drop it too."""
    remove_hook_from_module(module)
    if not module.__dict__.pop("_offload_map_had_forward", True):
        module.__dict__.pop("forward", None)
