"""Plot step time against peak GPU memory for every strategy in the committed benchmark results.

    python benchmarks/plot_pareto.py --model flux-12b   # writes benchmarks/results/pareto_flux-12b.png

Reads ``benchmarks/results/step_time_<model>*.jsonl`` (rows of ``benchmarks/step_time.py``) and draws
offload_map's points (``auto-*`` budgets and ``layerwise-w*`` windows) against the baselines, with the
transfer floor of streaming every block as a horizontal line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GB = 1e9
STYLE = {  # prefix -> (label, marker, colour)
    "auto-": ("offload_map auto (budget)", "o", "tab:blue"),
    "layerwise-": ("offload_map layerwise (window)", "s", "tab:cyan"),
    "resident": ("resident", "*", "black"),
    "diffusers-block": ("diffusers group offload, block", "^", "tab:orange"),
    "diffusers-leaf": ("diffusers group offload, leaf", "v", "tab:red"),
    "accelerate-cpu": ("accelerate cpu_offload", "X", "tab:gray"),
}


def load(model: str) -> tuple[dict, list[dict]]:
    """The first env row and, per strategy, its first row with a step time, over ``step_time_<model>.jsonl`` (the
    run with the baselines) and then the other result files in name order (a strategy measured in two runs is
    drawn once, from the run with the baselines when it has one). Compiled variants are left out: the plot
    compares offload policies at eager speed; so is ``auto-unlimited``, which is the resident point."""
    env, rows, seen = {}, [], {"auto-unlimited"}
    main = os.path.join(RESULTS, f"step_time_{model}.jsonl")
    others = sorted(set(glob.glob(os.path.join(RESULTS, f"step_time_{model}*.jsonl"))) - {main})
    for path in [main, *others] if os.path.exists(main) else others:
        for line in open(path):
            row = json.loads(line)
            if row.get("kind") == "env":
                env = env or row
            elif (
                row.get("step_s")
                and row.get("peak_gpu_alloc_bytes")
                and row["strategy"] not in seen
                and not row["strategy"].endswith("-compiled")
            ):
                seen.add(row["strategy"])
                rows.append(row)
    return env, rows


def plot(model: str, out: str) -> None:
    env, rows = load(model)
    fig, ax = plt.subplots(figsize=(8, 5))
    seen = set()
    for row in rows:
        prefix = next(p for p in STYLE if row["strategy"].startswith(p))
        label, marker, colour = STYLE[prefix]
        x, y = row["peak_gpu_alloc_bytes"] / GB, row["step_s"]
        ax.scatter(x, y, marker=marker, color=colour, s=70, label=None if label in seen else label, zorder=3)
        seen.add(label)
        ax.annotate(
            row["strategy"].replace("layerwise-", "").replace("auto-", ""),
            (x, y),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    if env.get("floor_s"):
        ax.axhline(env["floor_s"], ls="--", color="tab:green", label="floor: all blocks streamed at pinned bandwidth")
    ax.set_yscale("log")
    ax.set_xlabel("peak GPU memory allocated (GB)")
    ax.set_ylabel("one transformer forward (s, log scale)")
    ax.set_title(f"{model} at 1024x1024 on {env.get('device_name', '?')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux-12b")
    parser.add_argument("--out", help="PNG path (default benchmarks/results/pareto_<model>.png)")
    args = parser.parse_args()
    plot(args.model, args.out or os.path.join(RESULTS, f"pareto_{args.model}.png"))


if __name__ == "__main__":
    main()
