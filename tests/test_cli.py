"""The offload-map console script: demo, plan (from the shipped H100 profile), profile."""

from __future__ import annotations

import json

import pytest

from offload_map.cli import SHIPPED_PROFILE, main
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


@pytest.mark.parametrize("splits", [[5, 3], [0], [1000], "12", [1.5]])
def test_a_profile_with_bad_split_points_is_refused(splits):
    data = {"device_name": "x", "h2d_bytes_per_s": 1e9, "models": {"m": {
        "blocks": [{"path": "b.0", "bytes": 1000, "compute_s": 1e-3, "splits": splits}],
        "other_bytes": 0, "other_compute_s": 0.0, "activation_bytes": 0}}}
    with pytest.raises(ValueError, match=r"models\['m'\].blocks\[0\].splits"):
        DeviceProfile.from_dict(data)


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
    cost = DeviceProfile.load(out).models["tiny-flux"]
    assert cost.compute_s > 0 and all(b.splits for b in cost.blocks)
