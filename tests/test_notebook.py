"""The memory/speed notebook: stored executed with its figures, its cells equal to what its builder writes, and it
runs headless with its figures.

The notebook is executed with nbclient in a Jupyter kernel that runs this interpreter (a kernelspec written to
a temporary folder and put first on JUPYTER_PATH, so neither a missing nor a foreign ``python3`` kernelspec
matters). It runs in memory, from ``notebooks/`` as a user would; the executed copy goes to a temporary folder,
never over the stored notebook.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")


def _repo_root() -> Path:
    for folder in Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    raise FileNotFoundError("no pyproject.toml above tests/")


ROOT = _repo_root()
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK = NOTEBOOKS / "memory_speed_tradeoffs.ipynb"
KERNEL = "offload-map-test-python"
FIGURES = 3  # the trade-off curve, the timeline of a plan, memory over a step


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebook", NOTEBOOKS / "build_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs(nb) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def _figures(nb) -> list:
    return [out for out in _outputs(nb) if out.output_type in ("display_data", "execute_result") and "image/png" in out.data]


def test_notebook_is_stored_executed_with_its_figures():
    # A reader browsing the repository sees the plots; `python notebooks/build_notebook.py --execute` renews them.
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count is not None for cell in code), "stored without running every cell"
    assert len(_figures(nb)) >= FIGURES
    assert not [out for out in _outputs(nb) if out.output_type == "error"]


def test_notebook_matches_its_builder():
    stored = nbformat.read(NOTEBOOK, as_version=4)
    built = _builder().build()
    assert [(c.id, c.cell_type, c.source) for c in stored.cells] == [(c.id, c.cell_type, c.source) for c in built.cells], (
        "notebooks/memory_speed_tradeoffs.ipynb is out of date: run `python notebooks/build_notebook.py`"
    )


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernelspec for this interpreter, found first on JUPYTER_PATH; the kernel also inherits the env below."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "offload_map tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    path = os.environ.get("JUPYTER_PATH")
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(tmp_path / "jupyter"), path])))
    # The probed host-to-device bandwidth is cached here rather than in ~/.cache.
    monkeypatch.setenv("OFFLOAD_MAP_CACHE", str(tmp_path / "offload_map_cache"))
    return KERNEL


def test_notebook_runs_headless_and_draws_its_figures(tmp_path, kernel_name):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name=kernel_name, resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / NOTEBOOK.name)  # the executed copy, for a look after a failure
    outputs = _outputs(nb)
    errors = [f"{out.ename}: {out.evalue}" for out in outputs if out.output_type == "error"]
    assert not errors, errors
    assert len(_figures(nb)) >= FIGURES, f"expected at least {FIGURES} figures, got {len(_figures(nb))}"
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "Traceback" not in text
    assert "above the budget" not in text, "the notebook's own tiny pipeline should fit its budgets"
    assert "bit-exact" in text  # the live sweep printed its table
