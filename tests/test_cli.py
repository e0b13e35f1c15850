"""The offload-map console script: demo, plan (from the shipped H100 profile), profile."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from offload_map.cli import SHIPPED_PROFILE, main
from offload_map.mapping.memory import CODE_PIECE, STAGING_BUFFERS
from offload_map.mapping.sizes import human_bytes
from offload_map.planning.profile import DeviceProfile


def test_demo_runs_every_strategy_bit_exact(capsys):
    assert main(["demo", "--device", "cpu", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    for strategy in ("'none'", "'model'", "'layerwise'", "'auto'"):
        assert f"strategy {strategy}" in out
    assert "DeviceMap -> cpu" in out and "all strategies bit-identical" in out


def test_plan_reads_the_shipped_h100_profile(capsys):
    profile = DeviceProfile.load(SHIPPED_PROFILE)
    assert "H100" in profile.device_name and {"flux-12b", "sd35-medium"} <= set(profile.models)
    assert main(["plan", "--model", "flux-12b", "--budget", "12GiB"]) == 0
    out = capsys.readouterr().out
    assert "transformer_blocks.0" in out and "predicted step" in out and "bound" in out
    assert "in part" in out  # the profile's split points let the 12 GiB plan keep submodules of blocks resident


def test_plan_with_compression_counts_fewer_bytes_and_the_staging_buffers(capsys):
    def planned(*extra) -> tuple[float, str]:
        assert main(["plan", "--model", "flux-12b", "--budget", "8GiB", *extra]) == 0
        out = capsys.readouterr().out
        return float(out.split("predicted step ")[1].split(" ms")[0]), out

    raw, _ = planned()
    lossless, out = planned("--compression", "lossless")
    fp8, _ = planned("--compression", "fp8")
    staging = human_bytes(STAGING_BUFFERS * CODE_PIECE)  # Flux-12B's blocks are larger than a piece
    assert f"lossless compression (blocks cross the link in about 0.712 of their bytes; {staging} of staging" in out
    assert fp8 < lossless < raw  # an 8 GiB plan of Flux-12B is bound by copies: fewer bytes, a shorter step
    assert main(["plan", "--model", "flux-12b", "--budget", "1GiB", "--compression", "lossless"]) == 2
    err = capsys.readouterr().err
    minimum = err.split("below the minimum of ")[1].split(" ")[0]  # GiB, staging included
    assert "a device budget of 1.0 GiB" in err and float(minimum) > 1.2  # the raw plan's minimum is 1.2 GiB
    assert main(["plan", "--model", "flux-12b", "--budget", f"{float(minimum) + 0.1}GiB", "--compression", "lossless"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit, match="2"):
        main(["plan", "--model", "flux-12b", "--budget", "8GiB", "--compression", "zstd"])
    assert "invalid choice: 'zstd'" in capsys.readouterr().err


@pytest.mark.parametrize("splits", [[5, 3], [0], [1000], "12", [1.5]])
def test_a_profile_with_bad_split_points_is_refused(splits):
    data = {
        "device_name": "x",
        "h2d_bytes_per_s": 1e9,
        "models": {
            "m": {
                "blocks": [{"path": "b.0", "bytes": 1000, "compute_s": 1e-3, "splits": splits}],
                "other_bytes": 0,
                "other_compute_s": 0.0,
                "activation_bytes": 0,
            }
        },
    }
    with pytest.raises(ValueError, match=r"models\['m'\].blocks\[0\].splits"):
        DeviceProfile.from_dict(data)


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "--model", "flux-12b", "--budget", "1GB"], "below the minimum"),
        (["plan", "--model", "nope", "--budget", "1GB"], "has no model 'nope'"),
        (["plan", "--model", "flux-12b", "--budget", "lots"], "is not a size"),
    ],
)
def test_plan_errors_are_clear(capsys, args, message):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_profile_records_a_model_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_MAP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cpu.json"
    assert main(["profile", "--model", "tiny-flux", "--out", str(out), "--device", "cpu"]) == 0
    data = json.loads(out.read_text())
    assert data["device_name"] == "cpu" and len(data["models"]["tiny-flux"]["blocks"]) == 5
    cost = DeviceProfile.load(out).models["tiny-flux"]
    assert cost.compute_s > 0 and all(b.splits for b in cost.blocks)


def _console(*args: str) -> subprocess.CompletedProcess:
    """The console script as a user runs it, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "offload_map", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["plan", "--model", "flux-12b", "--budget", "12GiB", "--profile", "/nope.json"],
            "cannot read the profile /nope.json: No such file or directory",
        ),
        (["plan", "--model", "flux-12b", "--budget", "lots"], "'lots' is not a size"),
        (["plan", "--model", "sdxl", "--budget", "12GiB"], "has no model 'sdxl'"),
    ],
)
def test_the_console_script_reports_mistakes_in_one_line_without_a_traceback(args, message):
    done = _console(*args)
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_profile_without_cuda_or_without_diffusers_says_what_to_do(monkeypatch, capsys):
    import importlib.util

    if not torch.cuda.is_available():
        assert main(["profile", "--model", "tiny-flux", "--out", "x.json"]) == 2
        assert "CUDA is not available on this machine" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert main(["profile", "--model", "tiny-flux", "--out", "x.json", "--device", "cpu"]) == 2
    assert "pip install 'offload-map[diffusers]'" in capsys.readouterr().err


def test_plan_output_cut_short_by_its_reader_is_not_an_error():
    done = subprocess.run(
        f"{sys.executable} -m offload_map plan --model flux-12b --budget 12GiB | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.startswith("flux-12b on ") and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_help_is_plain_text_and_lists_the_models_a_plan_knows():
    top, plan = _console("--help"), _console("plan", "--help")
    assert top.returncode == 0 and "``" not in top.stdout and "offload-map plan --model flux-12b" in top.stdout
    assert "flux-12b" in plan.stdout and "sd35-medium" in plan.stdout


def test_a_budget_above_what_the_model_needs_is_noted(capsys):
    assert main(["plan", "--model", "flux-12b", "--budget", "200GB"]) == 0
    assert "note: 200GB is more than this model needs" in capsys.readouterr().out


def test_the_demo_prints_no_warning_about_its_own_pipeline():
    done = _console("demo", "--device", "cpu", "--steps", "2")
    assert done.returncode == 0 and "all strategies bit-identical" in done.stdout
    assert "above the budget" not in done.stdout + done.stderr and "WARNING" not in done.stderr.upper()
