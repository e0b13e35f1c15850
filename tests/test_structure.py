"""The shape of the package: data flows one way, each stage runs once per dispatch, a user's map is never changed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import offload_map
from offload_map import compile_device_map, dispatch_pipeline
from offload_map.demo import make_tiny_pipeline

PACKAGE = Path(offload_map.__file__).parent
# Each stage may import the stages before it, never those after: pipeline -> collect -> map -> plan -> runtime.
STAGES = ["collect", "mapping", "planning", "loading", "runtime"]
ABOVE = {
    "dispatch",
    "handle",
    "auto",
    "compat",
    "base",
    "layerwise_backend",
    "sequential_backend",
    "module_collector",
    "cli",
    "demo",
    "model_zoo",
}


def _imported(path: Path) -> set[str]:
    """The package's top-level parts that ``path`` imports (relative imports resolved)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1] if path.name != "__init__.py" else parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = [*base, *(node.module.split(".") if node.module else [])]
            names = [target] if node.module else [[*target, alias.name] for alias in node.names]
            out.update(name[1] for name in names if len(name) > 1)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            for name in [module] if module else [alias.name for alias in node.names]:
                if name and name.startswith("offload_map."):
                    out.add(name.split(".")[1])
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_the_stages_before_it(stage):
    allowed = set(STAGES[: STAGES.index(stage) + 1]) - ({"loading"} if stage in ("collect", "mapping", "planning") else set())
    for path in sorted((PACKAGE / stage).glob("*.py")):
        wrong = _imported(path) - allowed
        assert not wrong, f"{path.relative_to(PACKAGE)} imports {sorted(wrong)}, a later stage or the layer above"
        assert not _imported(path) & ABOVE


def test_every_stage_folder_says_what_it_owns():
    for stage in [*STAGES, "compat"]:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"offload_map/{stage}/__init__.py needs a docstring saying what the stage owns"


@pytest.mark.parametrize("strategy, budget", [("layerwise", None), ("model", None), ("auto", 0.5)])
def test_one_dispatch_discovers_the_pipeline_once_and_binds_the_map_once(monkeypatch, strategy, budget):
    import offload_map.collect.components as components
    import offload_map.dispatch as dispatch

    calls = {"discover": 0, "bind": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        components.ModuleDiscovery, "discover", staticmethod(counted("discover", components.ModuleDiscovery.discover))
    )
    monkeypatch.setattr(dispatch, "bind", counted("bind", dispatch.bind))
    pipe = make_tiny_pipeline()
    total = sum(compile_device_map(pipe, "none", "cpu").bytes_by_placement().values())
    calls.update(discover=0, bind=0)
    handle = dispatch_pipeline(pipe, strategy, "cpu", gpu_budget=int(total * budget) if budget else None)
    assert calls == {"discover": 1, "bind": 1}
    handle.remove()


def test_a_replan_gives_a_new_map_and_leaves_the_ones_the_user_holds_as_they_were(monkeypatch):
    monkeypatch.setattr("offload_map.dispatch.bandwidth", lambda device: 1e4)  # copy-bound: the plan keeps blocks
    pipe = make_tiny_pipeline()
    given = compile_device_map(pipe, "layerwise", "cpu")
    before = given.to_dict()
    total = sum(compile_device_map(pipe, "none", "cpu").bytes_by_placement().values())
    handle = dispatch_pipeline(pipe, "auto", "cpu", gpu_budget=int(total * 0.9))
    first = handle.device_map
    first_dict = first.to_dict()
    with torch.no_grad():
        for _ in range(2):  # the second forward is the timed one; the plan follows it
            pipe("a cat", steps=2)
    assert handle.plans, "the planner ran"
    assert handle.device_map is not first and handle.device_map.to_dict() != first_dict
    assert first.to_dict() == first_dict, "the map read before the re-plan changed behind the user's back"
    handle.remove()
    again = dispatch_pipeline(pipe, device_map=given)
    again.remove()
    assert given.to_dict() == before, "dispatch changed the map it was given"
