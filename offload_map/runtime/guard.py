"""``ComponentGuard``: refuses forwards of an offloaded component that would compute with the wrong weights."""

from __future__ import annotations

import operator
import sys
import threading
from itertools import chain

import torch
from torch import nn


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
        # Every module's children and parameters, as they were: a LoRA added, swapped or removed changes one of
        # these tables, and comparing their contents by identity costs far less per forward than a traversal.
        self._tables = [table for m in module.modules() for table in (m._modules, m._parameters)]
        self._sizes = list(map(len, self._tables))
        self._contents = tuple(chain.from_iterable(map(dict.values, self._tables)))
        self.owner: int | None = None
        self.depth = 0
        self._lock = threading.Lock()
        self._handles = [
            module.register_forward_pre_hook(self.enter),
            module.register_forward_hook(self.leave, always_call=True),
        ]

    def changed(self) -> bool:
        """Whether the module's submodules or parameters differ from those at dispatch, by identity (comparing
        tuples would compare a Parameter replaced by another by value, which raises for more than one element).
        Every step in C: about 0.2 us a table."""
        if list(map(len, self._tables)) != self._sizes:
            return True
        return not all(map(operator.is_, chain.from_iterable(map(dict.values, self._tables)), self._contents))

    @torch.compiler.disable
    def enter(self, module, args) -> None:
        """Before a forward (or another entry point) of ``module``: refuse it, or note this thread inside."""
        if self.changed():
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
    def leave(self, module, args, output) -> None:
        """After it, even one that raised."""
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


def _tensor_names(module: nn.Module) -> frozenset[str]:
    return frozenset(n for n, _ in module.named_parameters()) | frozenset(n for n, _ in module.named_buffers())
