"""accelerate ``ModelHook``s that drive the runtime, and attaching them so that removal leaves no trace.

- ``ComponentHook`` sits on every component. It exposes ``execution_device`` (diffusers pipelines read it
  to place latents), moves tensor inputs there, makes room for the component (``Swapper.activate``) and,
  on a streamed DiT, tells its ring where each forward begins and ends. diffusers' VAEs call
  ``_hf_hook.pre_forward`` from ``decode``/``encode`` too, so a pinned VAE is loaded for those.
- Entry points other than ``forward`` that pipelines call on a component (``ENTRY_POINTS``, ``vae.decode`` and
  the like, plus those a class names in ``_offload_map_entry_points``) run through the same hook, so the
  component is on the device for them too; diffusers' own ``apply_forward_hook`` methods already call it.
- ``BlockHook`` sits on every streamed block: before the block runs, its tail is waited for and bound
  into its slot; after, the slot is released and the tail points at the host again.

No profiler range spans a module's own forward: a forward that raises skips ``post_forward``, which would
leave such a range open. The loads (``offload_map::load <path>``) are ranges of their own.

Both stay out of ``torch.compile`` graphs (``torch.compiler.disable``): they move bytes, record events and
rebind parameters, which a graph must not capture. With regional compilation (diffusers'
``compile_repeated_blocks``, before or after dispatch) a block's own forward is compiled and the hooks run
eagerly around it; parameters rebound to another slot keep their shape, dtype and strides, so the compiled
block is reused without recompiling.
"""

from __future__ import annotations

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from torch import nn

from .calls import CallWatch
from .guard import ComponentGuard
from .ring import BlockRing
from .swapper import Swapper
from .undo import undo_each


class ComponentHook(ModelHook):
    """Before a component runs: evict what it excludes, load it if pinned, move inputs to its device."""

    def __init__(self, name: str, device: torch.device, swapper: Swapper, ring: BlockRing | None, calls: CallWatch) -> None:
        self.name = name
        self.execution_device = device
        self.swapper = swapper
        self.ring = ring
        self.calls = calls

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        self.calls.forward(self.name)
        self.swapper.activate(self.name)
        if self.ring is not None:
            self.ring.prefetcher.begin_forward()
        return _to_device(args, self.execution_device), {k: _to_device((v,), self.execution_device)[0] for k, v in kwargs.items()}

    @torch.compiler.disable
    def post_forward(self, module, output):
        if self.ring is not None:
            self.ring.prefetcher.end_forward()
        return output


class BlockHook(ModelHook):
    """Around a streamed block: its tail into its slot (the compute stream waiting for the copy), then out again."""

    def __init__(self, ring: BlockRing, index: int, path: str) -> None:
        self.prefetcher = ring.prefetcher
        self.index = index
        self.path = path

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{self.path} is streamed through a layer window, which is for inference only: its weights are "
                "overwritten once it ran, so autograd could not use them. Run under torch.no_grad() or "
                "torch.inference_mode() (diffusers pipelines already do)."
            )
        self.prefetcher.enter(self.index)
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module, output):
        self.prefetcher.exit(self.index)
        return output


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


# Methods besides ``forward`` through which pipelines run a component's weights.
_UNSET = object()  # an entry point with no instance attribute of its own before dispatch


def _unwrap(wrapped: tuple[nn.Module, str, object]) -> None:
    # Undo ``HookSet.wrap_entry_points`` for one entry point: its instance attribute as it was before.
    module, name, before = wrapped
    if before is _UNSET:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = before


ENTRY_POINTS = ("encode", "decode", "tiled_encode", "tiled_decode", "get_text_features", "get_image_features")


def entry_points(module: nn.Module) -> list[str]:
    """The methods of ``module`` besides ``forward`` that must run with its weights on the device: those of
    ``ENTRY_POINTS`` its class defines and those it declares in ``_offload_map_entry_points``, except the ones
    diffusers' ``apply_forward_hook`` already routes through the component's hook."""
    names = [*ENTRY_POINTS, *getattr(type(module), "_offload_map_entry_points", ())]
    out = []
    for name in dict.fromkeys(names):
        method = getattr(type(module), name, None)
        code = getattr(method, "__code__", None)
        if callable(method) and not (code and code.co_name == "wrapper" and code.co_filename.endswith("accelerate_utils.py")):
            out.append(name)
    return out


class HookSet:
    """The hooks, wrapped entry points and guards of one dispatch: attached one by one, all taken off by ``remove``."""

    def __init__(self) -> None:
        self.modules: list[nn.Module] = []
        self.wrapped: list[tuple[nn.Module, str, object]] = []  # module, entry point, its instance attribute before
        self.guards: list[ComponentGuard] = []

    def attach(self, module: nn.Module, hook: ModelHook) -> None:
        attach(module, hook)
        self.modules.append(module)

    def wrap_entry_points(self, module: nn.Module, hook: ModelHook, guard: ComponentGuard | None) -> None:
        """Run ``module``'s other entry points (``entry_points``) through ``hook`` and ``guard`` as its forward is."""
        for name in entry_points(module):
            method = getattr(module, name)

            @torch.compiler.disable
            def hooked_pre(*args, **kwargs):
                return hook.pre_forward(module, *args, **kwargs)

            def entry(*args, _method=method, **kwargs):
                if guard is not None:
                    guard.enter(module, args)
                try:
                    args, kwargs = hooked_pre(*args, **kwargs)
                    return hook.post_forward(module, _method(*args, **kwargs))
                finally:
                    if guard is not None:
                        guard.leave(module, args, None)

            # An instance attribute the user set (``vae.decode = f``) is wrapped too, and put back on removal.
            self.wrapped.append((module, name, module.__dict__.get(name, _UNSET)))
            module.__dict__[name] = entry

    def guard(self, name: str, module: nn.Module) -> ComponentGuard:
        self.guards.append(ComponentGuard(name, module))
        return self.guards[-1]

    def modules_changed(self) -> bool:
        """Whether a guarded component's parameters changed since dispatch (a LoRA was loaded or removed)."""
        return any(guard.changed() for guard in self.guards)

    def remove(self) -> None:
        """Take every hook and guard off. Safe to call twice; after an interrupt, calling again finishes
        (``undo.undo_each``)."""
        undo_each(self.wrapped, _unwrap)
        undo_each(self.modules, detach)
        undo_each(self.guards, ComponentGuard.remove)
