"""One rank of ``test_ranks.py``, run under ``accelerate launch --cpu --num_processes 2``.

Usage: rank_worker.py OUT_DIR CHECKPOINT_DIR MODE   (MODE: "run"; "kill" to SIGKILL rank 1 mid-step;
"nomemfd" where ``memfd_create`` fails, so ranks fall back to their own copies; "shard" to stream each block
as halves gathered between the ranks; "shard-auto": the same under a budget, with an idle probe of 10 kB/s;
"diverge": sharded, and rank 1 stops calling after one generation; "fail-pack": rank 0, which fills the shared
copy, fails while reading the checkpoint)

Each rank builds the tiny Flux pipeline with its transformer on the meta device, dispatches it layer-wise
with the transformer read from CHECKPOINT_DIR into the host copy its host shares, generates, and writes
OUT_DIR/rank<N>.pt: its output and what it saw of the shared region.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import FluxTransformer2DModel

sys.path.insert(0, str(Path(__file__).parent))
from offload_map import CheckpointError, dispatch_pipeline, empty_model
from offload_map.loading.checkpoint import Checkpoint  # noqa: E402
from offload_map.runtime import shared_host  # noqa: E402

from tiny_pipelines import make_flux_pipeline, run_flux  # noqa: E402


class warnings_to:
    """Copies offload_map's log records into a file while dispatching (the test reads the fallback warning)."""

    def __init__(self, path: Path) -> None:
        self.handler = logging.FileHandler(path)

    def __enter__(self):
        logging.getLogger("offload_map").addHandler(self.handler)

    def __exit__(self, *exc):
        logging.getLogger("offload_map").removeHandler(self.handler)
        self.handler.close()


ALIVE: list = []  # diverge: rank 0's lock, a raw descriptor: Python's finalization never closes it, the kernel does


def leave() -> None:
    """diverge: exit at once, without tearing down the process groups. A rank aborted (SIGABRT) once in CI, under
    load, after both ranks had saved what they saw: gloo's teardown after a timed-out collective is not this
    library's, and the test checks this library's error, not gloo's exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def memfd_inodes() -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split()[4] for line in maps if "memfd:offload_map" in line}


def main(out: Path, checkpoint: Path, mode: str) -> None:
    state = PartialState(cpu=True)
    if mode == "nomemfd":

        def refuse(*args):
            raise OSError(38, "Function not implemented")

        os.memfd_create = refuse
    pipe = make_flux_pipeline()
    pipe.transformer = empty_model(FluxTransformer2DModel, checkpoint)
    if mode == "diverge":  # fail fast: the test waits for the survivor's error
        shared_host.COLLECTIVE_TIMEOUT = timedelta(seconds=5)
        if state.process_index == 0:  # held until this process is gone (the kernel lets it go at exit)
            ALIVE.append(os.open(out / "rank0.alive", os.O_CREAT | os.O_WRONLY))
            fcntl.flock(ALIVE[0], fcntl.LOCK_EX)
    options = {}
    if mode == "shard-auto":  # a probe far below what the sharded loads reach: the plan must use theirs
        import offload_map.dispatch

        offload_map.dispatch.bandwidth = lambda device: 1e4
        total = sum(
            p.numel() * p.element_size()
            for c in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae)
            for p in c.parameters()
        )
        options = {"strategy": "auto", "gpu_budget": int(total * 1.1)}
    if mode == "fail-pack":
        if state.process_index == 0:

            def broken(self, name, out):
                raise CheckpointError("simulated: the disk went away")

            Checkpoint.read_into = broken
        try:
            dispatch_pipeline(pipe, "layerwise", "cpu", weights={"transformer": checkpoint})
        except (CheckpointError, RuntimeError) as err:
            seen = {
                "error": str(err),
                "meta": all(p.is_meta for p in pipe.transformer.parameters()),
                "hooked": any(hasattr(m, "_hf_hook") for m in pipe.transformer.modules()),
            }
            torch.save(seen, out / f"rank{state.process_index}.pt")
        return
    gathers = []
    if mode == "shard":  # where each all-gather writes: straight into a slot, this rank's chunk in place
        from offload_map.runtime import sharded_copy

        gather = sharded_copy._all_gather_into

        def spy(output, own, group=None):
            rings = pipe._offload_map_handle.runtime.rings.values()
            slots = {slot.buffer.untyped_storage().data_ptr() for ring in rings for slot in ring.pool.slots}
            gathers.append((output.untyped_storage().data_ptr() in slots, own.data_ptr() - output.data_ptr(), own.numel()))
            return gather(output, own, group=group)

        sharded_copy._all_gather_into = spy
    with warnings_to(out / f"log{state.process_index}.txt"):
        handle = dispatch_pipeline(
            pipe,
            options.pop("strategy", "layerwise"),
            "cpu",
            weights={"transformer": checkpoint},
            shard_copies=mode in ("shard", "shard-auto", "diverge"),
            **options,
        )
    copy = handle.host_copy
    seen = {
        "rank": state.process_index,
        "creator": copy.creator,
        "shared": copy.flat is not None,
        "ranks": copy.ranks,
        "inodes": sorted(memfd_inodes()),
        "shm_names": sorted(p for p in os.listdir("/dev/shm") if "offload" in p),
    }
    if mode == "kill" and state.process_index == 1:
        block = pipe.transformer.single_transformer_blocks[1]
        block.register_forward_pre_hook(lambda *_: os.kill(os.getpid(), signal.SIGKILL))
    seen["output"] = run_flux(pipe)
    if mode == "diverge" and state.process_index == 1:
        # Alive, but no longer loading blocks, until rank 0 has gone: a rank that left first would break the
        # connection under rank 0's timed-out collective, and gloo aborts rank 0 on that (a test race, under load).
        with open(out / "rank0.alive") as alive:
            fcntl.flock(alive, fcntl.LOCK_EX)
        leave()
    try:
        seen["second"] = run_flux(pipe)
    except RuntimeError as err:
        seen["error"] = str(err)
        torch.save(seen, out / f"rank{state.process_index}.pt")
        if mode == "diverge":
            leave()
        return
    stats = handle.report().stats
    seen["host_bytes"] = stats.bytes_h2d - stats.component_bytes  # blocks: what sharding splits between the ranks
    if gathers:
        seen["gathers"] = len(gathers)
        seen["into_slots"] = all(into_slot for into_slot, _, _ in gathers)
        seen["own_chunk_in_place"] = all(offset == state.process_index * size for _, offset, size in gathers)
    if handle.plans:
        plan = handle.plans["transformer"]
        seen["plan_bandwidth"], seen["measured_bandwidth"] = plan.bandwidth, plan.cost.copy_bandwidth
        seen["plan"] = (sorted(plan.resident), plan.window)
    handle.remove()
    torch.save(seen, out / f"rank{state.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
