"""The offload-map console script: demo, plan (from the shipped H100 profile), profile."""

from __future__ import annotations

import json

import pytest

from offload_map.cli import SHIPPED_PROFILE, main
from offload_map.profile import DeviceProfile


def test_demo_runs_every_strategy_bit_exact(capsys):
    assert main(["demo", "--device", "cpu", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    for strategy in ("'none'", "'model'", "'layerwise'", "'auto'"):
        assert f"strategy {strategy}" in out
    assert "DeviceMap -> cpu" in out and "all strategies bit-identical" in out


def test_plan_reads_the_shipped_h100_profile(capsys):
    profile = DeviceProfile.load(SHIPPED_PROFILE)
    assert "H100" in profile.device_name and {"flux-12b", "sd35-medium"} <= set(profile.models)
    assert main(["plan", "--model", "flux-12b", "--budget", "12GB"]) == 0
    out = capsys.readouterr().out
    assert "transformer_blocks.0" in out and "predicted step" in out and "bound" in out


@pytest.mark.parametrize("args, message", [
    (["plan", "--model", "flux-12b", "--budget", "1GB"], "below the minimum"),
    (["plan", "--model", "nope", "--budget", "1GB"], "has no model 'nope'"),
    (["plan", "--model", "flux-12b", "--budget", "lots"], "is not a size"),
])
def test_plan_errors_are_clear(capsys, args, message):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_profile_records_a_model_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_MAP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cpu.json"
    assert main(["profile", "--model", "tiny-flux", "--out", str(out), "--device", "cpu"]) == 0
    data = json.loads(out.read_text())
    assert data["device_name"] == "cpu" and len(data["models"]["tiny-flux"]["blocks"]) == 5
    assert DeviceProfile.load(out).models["tiny-flux"].compute_s > 0
