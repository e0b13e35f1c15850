"""Shared fixtures. The target device defaults to the CPU; ``pytest --target-device cuda`` runs the same
suite against a GPU (CUDA-only tests are marked ``cuda`` and skip cleanly without one)."""

from __future__ import annotations

import pytest
import torch


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


def resident_run(module_or_pipe, run, target: str):
    """The reference: ``run()`` with everything resident on ``target``, then back to the CPU."""
    module_or_pipe.to(target)
    try:
        out = run()
        return out.cpu() if isinstance(out, torch.Tensor) else out
    finally:
        module_or_pipe.to("cpu")
