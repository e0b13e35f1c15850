"""Host memory holding a streamed DiT's weights: raw or lossless; built in memory, read from a checkpoint by
``weights=``, or loaded with ``safetensors.torch.load_file`` as ``from_pretrained`` does (views of the file); and,
as ``memory-raw-whole``, the DiT built in memory and pinned whole (``strategy="model"``: one unit of all its bytes);
as ``memory-lossless-folder``, built in memory and coded with ``offload_folder`` (its raw bytes rest on disk).

Each case runs in a fresh process (its host memory is its own): build a DiT with bf16 weights ~ N(0, 0.02)
(or an empty one for ``weights=``), ``dispatch_pipeline(model, "layerwise", device, compression=...)``, run
one forward and compare it with the resident output. Host RSS is read from ``/proc/self/status`` after the
imports (the baseline), after dispatch and after the forward, and its peak (``VmHWM``) after dispatch; the DiT is
built in bf16, so building it peaks at its own bytes. ``report().host_bytes`` gives the bytes holding weights, raw
and coded.

Usage::

    python benchmarks/host_memory.py --gb 2 --out DIR [--device cuda]

Writes ``DIR/host_memory.jsonl`` and ``DIR/host_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offload_map import dispatch_pipeline  # noqa: E402

CASES = [
    "memory-raw",
    "memory-lossless",
    "checkpoint-raw",
    "checkpoint-lossless",
    "safetensors-raw",
    "safetensors-lossless",
    "memory-raw-whole",
    "memory-lossless-folder",
]
WIDTH = 2048


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class DiT(nn.Module):
    _layerwise_offload_blocks_attrs = ["blocks"]

    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def build(n: int, empty: bool) -> DiT:
    if empty:
        with torch.device("meta"):
            return DiT(n).to(torch.bfloat16)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # not built in float32 first: the peak RSS is dispatch's
    try:
        model = DiT(n)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) * 1024


def case(name: str, n: int, ckpt: Path, device: str) -> dict:
    base = rss()
    source, compression, *how = name.split("-")
    model = build(n, empty=source != "memory")
    weights = ckpt / "dit.safetensors" if source == "checkpoint" else None
    if source == "safetensors":
        from safetensors.torch import load_file

        model.load_state_dict(load_file(ckpt / "dit.safetensors"), assign=True)
    strategy = "model" if how == ["whole"] else "layerwise"
    folder = ckpt / "offload" if how == ["folder"] else None
    handle = dispatch_pipeline(
        model,
        strategy,
        device,
        weights=weights,
        compression=None if compression == "raw" else compression,
        progress=False,
        offload_folder=folder,
    )
    dispatched, peak = rss(), rss("VmHWM")
    with torch.inference_mode():
        out = model(torch.load(ckpt / "input.pt").to(device)).cpu()
    report = handle.report()
    return {
        "case": name,
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "rss_dispatched_bytes": dispatched - base,
        "rss_peak_bytes": peak - base,
        "rss_forward_bytes": rss() - base,
        "host_raw_bytes": report.host_bytes[0],
        "host_coded_bytes": report.host_bytes[1],
        "setup_s": report.setup_seconds,
        "exact": torch.equal(out, torch.load(ckpt / "output.pt")),
    }


def prepare(n: int, ckpt: Path, device: str) -> None:
    from safetensors.torch import save_file

    model = build(n, empty=False)
    save_file(model.state_dict(), ckpt / "dit.safetensors")
    x = torch.randn(1, 256, WIDTH, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.inference_mode():
        out = model.to(device)(x.to(device)).cpu()
    torch.save(x, ckpt / "input.pt")
    torch.save(out, ckpt / "output.pt")


def table(rows: list[dict], device: str) -> str:
    gb = 1e9
    lines = [
        f"# host_memory: a {rows[0]['weights_bytes'] / gb:.2f} GB bf16 DiT streamed layer-wise on {device}",
        "",
        "RSS: above the process's after imports; x weights: RSS after dispatch / the weights' bytes",
        "",
        "| case | RSS after dispatch GB | x weights | RSS peak GB | RSS after a forward GB | held raw GB | held coded GB | "
        "setup s | exact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['rss_dispatched_bytes'] / gb:.2f} | {r['rss_dispatched_bytes'] / r['weights_bytes']:.2f} | "
            f"{r['rss_peak_bytes'] / gb:.2f} | {r['rss_forward_bytes'] / gb:.2f} | {r['host_raw_bytes'] / gb:.2f} | {r['host_coded_bytes'] / gb:.2f} | "
            f"{r['setup_s']:.2f} | {'yes' if r['exact'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="weights to build, in GB")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = max(1, round(args.gb * 1e9 / (16 * WIDTH * WIDTH)))  # two bf16 linears of 4 x WIDTH^2 weights a block
    if args.case:  # one case, in this fresh process
        print(json.dumps(case(args.case, n, args.ckpt, args.device)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prepare(n, Path(tmp), args.device)
        for name in CASES:
            cmd = [sys.executable, __file__, "--gb", str(args.gb), "--out", str(args.out), "--device", args.device]
            done = subprocess.run(cmd + ["--case", name, "--ckpt", tmp], capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out / "host_memory.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (args.out / "host_memory.md").write_text(table(rows, args.device))
    print(table(rows, args.device))


if __name__ == "__main__":
    main()
