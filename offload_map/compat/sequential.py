"""vllm-omni's sequential offload of loose modules: ``apply_sequential_offload``, ``remove_sequential_offload``,
on offload_map's ``"cpu-pinned"`` placement (``dispatch_pipeline(..., "model")``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..dispatch import OffloadHandle, dispatch_pipeline

_SEQUENTIAL_ATTR = "_offload_map_sequential"


class _ModuleSet:
    """A pipeline-like holder for loose modules, named so that discovery gives each its role."""

    def __init__(self, dits: list[nn.Module], encoders: list[nn.Module]) -> None:
        for i, module in enumerate(dits):
            setattr(self, f"transformer_{i}", module)
        for i, module in enumerate(encoders):
            setattr(self, f"text_encoder_{i}", module)


def apply_sequential_offload(
    dit_modules: list[nn.Module],
    encoder_modules: list[nn.Module],
    device: torch.device,
    pin_memory: bool = True,
    use_hsdp: bool = False,
) -> None:
    """Apply sequential offloading hooks to DiT and encoder modules.

    Before a DiT runs, the encoders and every other DiT leave the device; before an encoder runs, the DiTs
    leave. Host copies are packed once (pinned when ``pin_memory``); with ``use_hsdp`` copies are blocking.

    Args:
        dit_modules: DiT/transformer modules.
        encoder_modules: encoder modules (a VAE may be listed here too).
        device: target device.
        pin_memory: pin host copies for faster, asynchronous transfers.
        use_hsdp: HSDP is on (copies become blocking).

    Raises:
        ValueError: a module is listed twice, or in both lists, or both lists are empty.
        RuntimeError: a module is already under offload hooks.

    Example:
        >>> from offload_map.demo import make_tiny_pipeline
        >>> pipe = make_tiny_pipeline()
        >>> apply_sequential_offload([pipe.transformer], [pipe.text_encoder, pipe.vae], torch.device("cpu"))
        >>> remove_sequential_offload([pipe.transformer, pipe.text_encoder, pipe.vae])
    """
    dits, encoders = list(dit_modules), list(encoder_modules)
    ids = [id(m) for m in dits + encoders]
    if len(set(ids)) != len(ids):
        raise ValueError(
            "a module appears more than once in dit_modules/encoder_modules; each module may be listed once, in one list"
        )
    if not ids:
        raise ValueError("apply_sequential_offload needs at least one module in dit_modules or encoder_modules")
    for module in dits + encoders:
        if not isinstance(module, nn.Module):
            raise ValueError(f"expected nn.Module entries, got {type(module).__name__}")
        if _SEQUENTIAL_ATTR in module.__dict__:
            raise RuntimeError(
                f"{type(module).__name__} is already under sequential offload; call remove_sequential_offload first"
            )
    handle = dispatch_pipeline(_ModuleSet(dits, encoders), "model", device, pin_memory=pin_memory, blocking=use_hsdp)
    for module in dits + encoders:
        module.__dict__[_SEQUENTIAL_ATTR] = handle


def remove_sequential_offload(modules: Iterable) -> None:
    """Remove sequential offloading hooks from modules (nested lists allowed); modules stay where they are.

    The hooks of every module that was offloaded together with any of ``modules`` are removed.

    Example:
        >>> from offload_map.demo import make_tiny_pipeline
        >>> pipe = make_tiny_pipeline()
        >>> apply_sequential_offload([pipe.transformer], [pipe.text_encoder], torch.device("cpu"))
        >>> remove_sequential_offload([[pipe.transformer], [pipe.text_encoder]])
    """
    handles: dict[int, OffloadHandle] = {}
    for module in _flatten(modules):
        handle = module.__dict__.get(_SEQUENTIAL_ATTR)
        if handle is not None:
            handles[id(handle)] = handle
    for handle in handles.values():
        for module in vars(handle.pipeline).values():
            if isinstance(module, nn.Module):
                module.__dict__.pop(_SEQUENTIAL_ATTR, None)
        handle.detach()


def _flatten(items) -> Iterable[nn.Module]:
    for item in items:
        if isinstance(item, nn.Module):
            yield item
        else:
            yield from _flatten(item)
