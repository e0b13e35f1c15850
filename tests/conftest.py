"""Shared fixtures and helpers. The target device defaults to the CPU; ``pytest --target-device cuda`` runs the
same suite against a GPU (CUDA-only tests are marked ``cuda`` and skip cleanly without one).

- ``case`` (every pipeline of ``PIPELINES``) and ``diffusers_case`` (the diffusers ones): a pipeline, how to
  run it, and its resident output on the target, built once per test module;
- ``resident_run``: the reference output; ``assert_parity``: dispatch, run, compare bit for bit;
- ``pipeline_state``/``assert_restored``: every tensor's device, dtype, strides and value, before and after.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

from offload_map import Role, dispatch_pipeline
from offload_map.demo import make_tiny_pipeline
from offload_map.module_collector import ModuleDiscovery

from tiny_pipelines import make_flux_pipeline, make_llama_pipeline, make_wan22_pipeline, run_flux, run_llama, run_wan22

PIPELINES = {
    "flux": (make_flux_pipeline, run_flux),
    "wan22": (make_wan22_pipeline, run_wan22),
    "plain": (make_tiny_pipeline, lambda pipe: pipe("a red cat", steps=3)),
}
# Pipelines whose text encoders have block lists (T5 and CLIP, UMT5, a Llama decoder).
ENCODER_PIPELINES = {
    "flux": (make_flux_pipeline, run_flux),
    "wan22": (make_wan22_pipeline, run_wan22),
    "llama": (make_llama_pipeline, run_llama),
}


def pytest_addoption(parser):
    parser.addoption("--target-device", default="cpu", help="device the offload tests dispatch to (cpu, cuda, cuda:1)")


@pytest.fixture(scope="session")
def target(request) -> str:
    device = request.config.getoption("--target-device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--target-device asks for CUDA, which this machine lacks")
    return device


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine with `pytest -m cuda`)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def assert_no_host_sync(run, calls: int = 3) -> None:
    """``run()`` ``calls`` times with torch's CUDA sync debug mode raising on any host synchronisation."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(calls):
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def resident_run(module_or_pipe, run, target: str):
    """The reference: ``run()`` with everything resident on ``target``, then back to the CPU."""
    module_or_pipe.to(target)
    try:
        out = run()
        return out.cpu() if isinstance(out, torch.Tensor) else out
    finally:
        module_or_pipe.to("cpu")


class Case(NamedTuple):
    """A pipeline, how to run it, and its resident output on the target device."""

    name: str
    pipe: object
    run: Callable
    reference: torch.Tensor


def _case(name: str, target: str) -> Case:
    make, run = {**PIPELINES, **ENCODER_PIPELINES}[name]
    pipe = make()
    return Case(name, pipe, run, resident_run(pipe, lambda: run(pipe), target))


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def case(request, target) -> Case:
    return _case(request.param, target)


@pytest.fixture(scope="module", params=["flux", "wan22"])
def diffusers_case(request, target) -> Case:
    return _case(request.param, target)


@pytest.fixture(scope="module", params=sorted(ENCODER_PIPELINES))
def encoder_case(request, target) -> Case:
    return _case(request.param, target)


def assert_parity(case: Case, target: str, runs: int = 2, **dispatch_args):
    """Dispatch ``case.pipe`` to ``target`` with ``dispatch_args``, run it ``runs`` times and assert that every output
    equals the resident run bit for bit; returns the handle (still dispatched)."""
    handle = dispatch_pipeline(case.pipe, device=target, **dispatch_args)
    for _ in range(runs):
        out = case.run(case.pipe)
        assert torch.equal(out.cpu(), case.reference), f"{case.name}: output differs from the resident run"
    return handle


def dits(pipe) -> list[tuple[str, torch.nn.Module]]:
    found = ModuleDiscovery.discover(pipe)
    return [(c.name, c.module) for c in found.components.values() if c.role is Role.DIT]


def probe_inside(module: torch.nn.Module, probe: Callable[[], None]) -> list:
    """Hooks that call ``probe()`` before each leaf module of ``module`` that holds weights runs: while the
    component computes, in its forward, in another entry point (``decode``) or called by the pipeline after its
    forward returned (diffusers' ``clip_skip`` runs the text encoder's final norm so)."""
    leaves = [m for m in module.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
    return [leaf.register_forward_pre_hook(lambda *_: probe()) for leaf in leaves]


def pipeline_state(pipe) -> dict:
    """Every tensor of the pipeline: device, dtype, strides and a copy of its value."""
    return {
        f"{c.name}.{k}": (v.device, v.dtype, v.stride(), v.detach().clone())
        for c in ModuleDiscovery.discover(pipe).components.values()
        for k, v in c.module.state_dict(keep_vars=True).items()
    }


def assert_restored(pipe, before: dict) -> None:
    """Every tensor as ``pipeline_state`` saw it, bit for bit, and no hook left."""
    after = pipeline_state(pipe)
    assert after.keys() == before.keys()
    for key, (device, dtype, stride, value) in before.items():
        d, t, s, v = after[key]
        assert (d, t, s) == (device, dtype, stride), key
        assert torch.equal(v, value), key
    for _, module in dits(pipe):
        for m in module.modules():
            assert not hasattr(m, "_hf_hook") and "forward" not in m.__dict__
    assert not hasattr(pipe, "_offload_map_handle")


def two_cpu_ranks(*args: str) -> list[str]:
    """The command that runs ``args`` (a script and its arguments) as two ranks under ``accelerate launch`` on the
    CPU: --multi_gpu goes through torchrun (accelerate's --cpu would go through mpirun), and the script asks
    ``PartialState(cpu=True)`` for gloo."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *args,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
