"""``examples/accelerate_launch.py`` on a real (tiny) diffusers pipeline directory: the transformer is built on
the meta device and read from its safetensors in place; alone, and as two ranks with sharded streaming."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import two_cpu_ranks
from tiny_pipelines import make_flux_pipeline

EXAMPLE = Path(__file__).parent.parent / "examples" / "accelerate_launch.py"


def test_the_example_generates_from_a_pipeline_directory_alone_and_as_two_ranks(tmp_path):
    make_flux_pipeline().save_pretrained(tmp_path / "pipe")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    args = [str(EXAMPLE), "--pipeline", str(tmp_path / "pipe"), "--steps", "2"]
    alone = subprocess.run(
        [sys.executable, *args, "--prompt", "a red cat", "--out", str(tmp_path / "alone")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "host copy private" in alone.stdout and (tmp_path / "alone" / "rank0_0.png").exists()
    ranks = subprocess.run(
        two_cpu_ranks(*args, "--shard", "--out", str(tmp_path / "ranks")),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout.count("host copy shared by ranks [0, 1]") == 2
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == ["rank0_0.png", "rank0_1.png", "rank1_0.png", "rank1_1.png"]
