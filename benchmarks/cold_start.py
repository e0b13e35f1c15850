"""Cold start and host memory: safetensors on disk -> first step ready, against reading the files alone and
against diffusers' load + group offload, and N ranks of one host sharing one host copy.

Usage (GPU)::

    python benchmarks/cold_start.py --model flux-12b --ckpt /tmp/flux_ckpt --out DIR \\
        [--phases write,read,offload_map,offload_map-lossless,diffusers,ranks1,ranks2] [--cache cold|warm]

Usage (no GPU, checks the script itself)::

    python benchmarks/cold_start.py --model tiny-flux --ckpt /tmp/tiny_ckpt --out DIR --cpu-smoke

Phases, each in a fresh process (so host memory is its own):

* ``write``        the model with random bf16 weights, saved as 5 GB safetensors shards + index + config
                   (skipped if the checkpoint exists).
* ``read``         every shard read into one host buffer, with offload_map's reader threads: the time to
                   read the files alone.
* ``offload_map``  ``empty_model`` + ``dispatch_pipeline(model, "layerwise", weights=ckpt)``: seconds to
                   ready, then three timed steps; host RSS peak (sampled) and after.
* ``offload_map-lossless``  the same with ``compression="lossless"``: blocks the checkpoint stores as laid out
                   are held only as their code (``runtime.mapped_host``); the row adds the host bytes holding
                   weights, raw and coded, from ``report()``.
* ``pretrained-lossless``  ``from_pretrained`` (weights left as views of the files) + the same dispatch: blocks
                   held only as their code without ``weights=``.
* ``diffusers``    ``from_pretrained`` + ``enable_group_offload(block_level, use_stream=True)``: the same.
* ``ranksN``       N ranks (torchrun, all on this machine's GPU 0 unless it has N) each dispatching the
                   model with the shared host copy, then timing steps at the same time; the host memory of
                   all ranks together is the machine's used memory (MemTotal - MemAvailable) above the
                   baseline before launch, sampled at 20 Hz, and the sum of the ranks' PSS.
                   ``ranksN-sharded``: the same with ``shard_copies=True`` (each rank streams 1/N of every
                   block and the ranks all-gather the rest; meant for N GPUs of one host).

``--cache cold`` (default) evicts the shards from the page cache before each phase
(``posix_fadvise(DONTNEED)`` after ``fsync``), so reads come from the disk; ``warm`` reads them from memory.
Writes ``DIR/cold_start_<model>.jsonl`` (one row per phase and per rank) and ``DIR/cold_start_<model>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offload_map import dispatch_pipeline, empty_model  # noqa: E402
from offload_map import model_zoo as models  # noqa: E402
from offload_map.runtime.host_store import PACK_THREADS  # noqa: E402

from step_time import RssSampler, read_status_bytes  # noqa: E402

GB = 1e9
SHARD = 5 * 10**9
STEPS = 3


def shards(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def evict(ckpt: Path) -> None:
    for file in shards(ckpt):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write(spec, ckpt: Path, cuda: bool) -> dict:
    from safetensors.torch import save_file

    if (ckpt / "config.json").exists():
        return {"phase": "write", "skipped": True}
    start = time.perf_counter()
    model = models.build_meta_model(spec)
    ckpt.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator("cuda" if cuda else "cpu").manual_seed(0)
    names = [(n, p) for n, p in model.named_parameters()]
    groups, current, size = [], [], 0
    for name, param in names:
        nbytes = param.numel() * models.DTYPE.itemsize
        if current and size + nbytes > SHARD:
            groups.append(current)
            current, size = [], 0
        current.append((name, param.shape))
        size += nbytes
    groups.append(current)
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            name: (torch.randn(shape, generator=gen, device=gen.device, dtype=models.DTYPE) * 0.02).cpu() for name, shape in group
        }
        save_file(tensors, ckpt / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (ckpt / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.save_config(ckpt)
    return {
        "phase": "write",
        "seconds": time.perf_counter() - start,
        "shards": len(groups),
        "bytes": sum(f.stat().st_size for f in shards(ckpt)),
    }


def read(ckpt: Path) -> dict:
    files = shards(ckpt)
    sizes = [f.stat().st_size for f in files]
    buffer = torch.empty(sum(sizes), dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    chunk = 64 * 2**20
    jobs, offset = [], 0
    for file, size in zip(files, sizes):
        jobs += [(file, pos, offset + pos, min(chunk, size - pos)) for pos in range(0, size, chunk)]
        offset += size

    def one(job):
        file, pos, at, n = job
        with open(file, "rb", buffering=0) as f:
            f.seek(pos)
            done = 0
            while done < n:
                done += f.readinto(view[at + done : at + n])

    start = time.perf_counter()
    with ThreadPoolExecutor(PACK_THREADS) as pool:
        list(pool.map(one, jobs))
    seconds = time.perf_counter() - start
    return {"phase": "read", "seconds": seconds, "bytes": sum(sizes), "GBps": sum(sizes) / seconds / GB, "threads": PACK_THREADS}


def timed_steps(model, spec, device: str) -> list[float]:
    inputs = models.make_inputs(spec, model, device, seed=0)
    times = []
    with torch.inference_mode():
        for _ in range(STEPS + 1):
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(**inputs)
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times[1:]


def load_offload_map(
    cls, ckpt: Path, device: str, shard: bool = False, compression: str | None = None
) -> tuple[torch.nn.Module, object]:
    start = time.perf_counter()
    model = empty_model(cls, ckpt, dtype=models.DTYPE)
    built = time.perf_counter() - start
    handle = dispatch_pipeline(
        model, "layerwise", device, weights=ckpt, progress=False, shard_copies=shard, compression=compression
    )
    report = handle.report()
    handle.breakdown = {
        "empty_model_s": built,
        "dispatch_s": report.setup_seconds,
        "host_raw_bytes": report.host_bytes[0],
        "host_coded_bytes": report.host_bytes[1],
        **{k: v for k, v in vars(report.setup_times).items()},
    }
    return model, handle


def load_diffusers(cls, ckpt: Path, device: str) -> tuple[torch.nn.Module, None]:
    model = cls.from_pretrained(ckpt, torch_dtype=models.DTYPE)
    model.enable_group_offload(
        torch.device(device), offload_type="block_level", num_blocks_per_group=1, use_stream=device != "cpu"
    )
    return model, None


def model_class(spec):
    """The diffusers class, imported before any clock starts (importing it takes seconds, for both loaders alike)."""
    import diffusers

    return getattr(diffusers, spec.class_name)


def single(phase: str, spec, ckpt: Path, device: str) -> dict:
    cls = model_class(spec)
    if device != "cpu":
        torch.cuda.init()
    with RssSampler() as sampler:
        start = time.perf_counter()
        if phase.startswith("offload_map"):
            compression = "lossless" if phase == "offload_map-lossless" else None
            model, handle = load_offload_map(cls, ckpt, device, compression=compression)
        elif phase == "pretrained-lossless":
            model = cls.from_pretrained(ckpt, torch_dtype=models.DTYPE)
            handle = dispatch_pipeline(model, "layerwise", device, compression="lossless", progress=False)
            report = handle.report()
            handle.breakdown = {"host_raw_bytes": report.host_bytes[0], "host_coded_bytes": report.host_bytes[1]}
        else:
            model, handle = load_diffusers(cls, ckpt, device)
        ready = time.perf_counter() - start
        after = sampler.sample()
        steps = timed_steps(model, spec, device)
    return {
        "phase": phase,
        "ready_s": ready,
        "rss_after_gb": after / GB,
        "rss_peak_gb": sampler.peak / GB,
        "step_s": statistics.median(steps),
        "steps": steps,
        "breakdown": getattr(handle, "breakdown", None),
    }


def pss() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024


def rank_worker(spec, ckpt: Path, out: Path, shard: bool) -> None:
    import torch.distributed as dist
    from accelerate import PartialState

    cuda = torch.cuda.is_available()
    state = PartialState(cpu=not cuda, backend="gloo")
    device = f"cuda:{state.local_process_index % torch.cuda.device_count()}" if cuda else "cpu"
    cls = model_class(spec)
    start = time.perf_counter()
    model, handle = load_offload_map(cls, ckpt, device, shard)
    ready = time.perf_counter() - start
    copy = handle.host_copy
    dist.barrier()  # time the steps of all ranks together
    steps = timed_steps(model, spec, device)
    row = {
        "phase": f"ranks{state.num_processes}" + ("-sharded" if shard else ""),
        "rank": state.process_index,
        "device": device,
        "ready_s": ready,
        "shared": copy is not None and copy.flat is not None,
        "creator": bool(copy and copy.creator),
        "pss_gb": pss() / GB,
        "rss_gb": read_status_bytes("VmRSS") / GB,
        "step_s": statistics.median(steps),
        "steps": steps,
    }
    dist.barrier()
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def used_memory() -> int:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":")
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def ranks(n: int, shard: bool, args, out: Path) -> dict:
    name = f"ranks{n}" + ("-sharded" if shard else "")
    rows = out.with_suffix(f".{name}.jsonl")
    rows.unlink(missing_ok=True)
    base, peak, stop = used_memory(), [0], threading.Event()

    def sample():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], used_memory() - base)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n),
        "--master_port",
        str(29600 + n),
        __file__,
        "--model",
        args.model,
        "--ckpt",
        str(args.ckpt),
        "--rank-worker",
        str(rows),
    ] + (["--shard"] if shard else [])
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    stop.set()
    thread.join()
    if done.returncode:
        return {"phase": name, "error": done.stderr[-2000:]}
    per_rank = [json.loads(line) for line in rows.read_text().splitlines()]
    return {
        "phase": name,
        "wall_s": time.perf_counter() - start,
        "host_used_peak_gb": peak[0] / GB,
        "pss_sum_gb": sum(r["pss_gb"] for r in per_rank),
        "per_rank": per_rank,
    }


def table(rows: list[dict], weights_gb: float) -> str:
    lines = [
        f"weights (safetensors bytes): {weights_gb:.1f} GB",
        "",
        "| phase | ready s | step s | host RSS after GB | host RSS peak GB | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:  # a phase that failed: its row says so, and the phases after it still get theirs
            reason = r["error"].strip().splitlines()[-1] if r["error"].strip() else "no message"
            lines.append(f"| {r['phase']} | failed | | | | {reason[:200]} |")
        elif r["phase"] == "read":
            lines.append(f"| read files alone | {r['seconds']:.2f} | | | | {r['GBps']:.2f} GB/s, {r['threads']} threads |")
        elif r["phase"] in ("offload_map", "offload_map-lossless", "pretrained-lossless", "diffusers"):
            held = r.get("breakdown") or {}
            note = (
                f"weights held: {held['host_raw_bytes'] / GB:.1f} GB raw, {held['host_coded_bytes'] / GB:.1f} GB coded"
                if held.get("host_coded_bytes")
                else ""
            )
            lines.append(
                f"| {r['phase']} | {r['ready_s']:.2f} | {r['step_s']:.3f} | {r['rss_after_gb']:.1f} | {r['rss_peak_gb']:.1f} | {note} |"
            )
        elif "per_rank" in r:
            ranks_ = r["per_rank"]
            steps = ", ".join(f"{x['step_s']:.3f}" for x in ranks_)
            lines.append(
                f"| {r['phase']} | {max(x['ready_s'] for x in ranks_):.2f} | "
                f"{steps} | PSS sum {r['pss_sum_gb']:.1f} | "
                f"used {r['host_used_peak_gb']:.1f} | shared {[x['shared'] for x in ranks_]} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux-12b")
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--phases", default="write,read,offload_map,diffusers,ranks1,ranks2")
    parser.add_argument("--cache", choices=("cold", "warm"), default="cold")
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--rank-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec = models.resolve_spec(args.model)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = "cuda:0" if cuda else "cpu"
    if args.rank_worker:
        return rank_worker(spec, args.ckpt, args.rank_worker, args.shard)
    if args.phase:  # one phase, in this fresh process
        row = read(args.ckpt) if args.phase == "read" else single(args.phase, spec, args.ckpt, device)
        print(json.dumps(row))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"cold_start_{spec.name}.jsonl"
    rows = []
    for phase in args.phases.split(","):
        if phase != "write" and args.cache == "cold":
            evict(args.ckpt)
        if phase == "write":
            row = write(spec, args.ckpt, cuda)
        elif phase.startswith("ranks"):
            count, _, sharded = phase[5:].partition("-")
            row = ranks(int(count), sharded == "sharded", args, out)
        else:
            cmd = [sys.executable, __file__, "--model", args.model, "--ckpt", str(args.ckpt), "--phase", phase]
            done = subprocess.run(cmd + (["--cpu-smoke"] if args.cpu_smoke else []), capture_output=True, text=True)
            row = (
                json.loads(done.stdout.splitlines()[-1])
                if done.returncode == 0
                else {"phase": phase, "error": done.stderr[-2000:]}
            )
        row.update(model=spec.name, cache=args.cache, device=torch.cuda.get_device_name(0) if cuda else "cpu")
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    weights_gb = sum(f.stat().st_size for f in shards(args.ckpt)) / GB
    (args.out / f"cold_start_{spec.name}.md").write_text(table(rows, weights_gb))
    print(table(rows, weights_gb))


if __name__ == "__main__":
    main()
