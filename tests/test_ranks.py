"""Ranks of one host under ``accelerate launch``: one shared host copy, outputs equal to one rank, and
nothing left in shared memory when a rank is killed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import two_cpu_ranks
from tiny_pipelines import make_flux_pipeline, run_flux

WORKER = Path(__file__).parent / "rank_worker.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pipe = make_flux_pipeline()
    path = tmp_path_factory.mktemp("ranks") / "transformer"
    pipe.transformer.save_pretrained(path)
    return path, run_flux(pipe)


def launch(out: Path, checkpoint: Path, mode: str) -> subprocess.CompletedProcess:
    cmd = two_cpu_ranks(str(WORKER), str(out), str(checkpoint), mode)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def both_ranks(out: Path, checkpoint: Path, mode: str) -> list[dict]:
    """Launch two ranks in ``mode``, require a clean exit, and return what each rank saw."""
    done = launch(out, checkpoint, mode)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]


def memfd_holders() -> list[str]:
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                if any("memfd:offload_map" in line for line in maps):
                    holders.append(pid)
        except OSError:
            continue
    return holders


def test_two_ranks_share_one_host_copy_and_match_one_rank(checkpoint, tmp_path):
    path, reference = checkpoint
    seen = both_ranks(tmp_path, path, "run")
    for rank in seen:
        assert torch.equal(rank["output"], reference) and torch.equal(rank["second"], reference)
        assert rank["shared"] and rank["ranks"] == [0, 1]
        assert rank["shm_names"] == []  # the region has no name anywhere
    assert [rank["creator"] for rank in seen] == [True, False]  # created once
    assert seen[0]["inodes"] and seen[0]["inodes"] == seen[1]["inodes"]  # both map the same memory
    assert not memfd_holders()


def test_a_rank_killed_mid_step_leaves_no_shared_memory(checkpoint, tmp_path):
    path, _ = checkpoint
    before = set(os.listdir("/dev/shm"))
    done = launch(tmp_path, path, "kill")
    assert done.returncode != 0 and not (tmp_path / "rank1.pt").exists()
    assert not memfd_holders()
    assert set(os.listdir("/dev/shm")) <= before


def test_without_memfd_every_rank_keeps_its_own_copy_and_says_so(checkpoint, tmp_path):
    path, reference = checkpoint
    for seen in both_ranks(tmp_path, path, "nomemfd"):
        assert torch.equal(seen["output"], reference) and not seen["shared"] and not seen["inodes"]
    assert "cannot create a shared host copy" in (tmp_path / "log0.txt").read_text()


def test_sharded_streaming_reads_half_of_each_block_per_rank_and_matches_one_rank(checkpoint, tmp_path):
    path, reference = checkpoint
    sharded = both_ranks(tmp_path, path, "shard")
    (tmp_path / "direct").mkdir()
    whole = both_ranks(tmp_path / "direct", path, "run")[0]["host_bytes"]
    for seen in sharded:
        assert torch.equal(seen["output"], reference) and torch.equal(seen["second"], reference)
        assert 0.4 * whole < seen["host_bytes"] < 0.6 * whole  # half of every block from this rank's host copy
        assert seen["gathers"] and seen["into_slots"] and seen["own_chunk_in_place"]  # no tensor allocated per block


def test_a_rank_that_stops_makes_the_other_fail_with_a_clear_error_not_hang(checkpoint, tmp_path):
    path, reference = checkpoint
    done = launch(tmp_path, path, "diverge")
    survivor = torch.load(tmp_path / "rank0.pt")
    assert torch.equal(survivor["output"], reference)
    assert "another rank stopped or the ranks diverged" in survivor["error"], survivor["error"]
    assert not memfd_holders() and done.returncode == 0


def test_a_budget_under_sharded_streaming_plans_with_the_bandwidth_the_sharded_loads_reached(checkpoint, tmp_path):
    path, reference = checkpoint
    seen = both_ranks(tmp_path, path, "shard-auto")
    for rank in seen:
        assert torch.equal(rank["output"], reference) and torch.equal(rank["second"], reference)
        assert rank["plan_bandwidth"] == rank["measured_bandwidth"] > 1e4
    assert seen[0]["plan"] == seen[1]["plan"] and seen[0]["measured_bandwidth"] == seen[1]["measured_bandwidth"]


def test_when_the_rank_filling_the_shared_copy_fails_the_others_fail_at_once_and_keep_their_model(checkpoint, tmp_path):
    path, _ = checkpoint
    filler, other = both_ranks(tmp_path, path, "fail-pack")
    assert "the disk went away" in filler["error"]
    assert "rank(s) [0] failed while packing" in other["error"]
    for rank in (filler, other):
        assert rank["meta"] and not rank["hooked"]  # nothing loaded, nothing left hooked
    assert not memfd_holders()
