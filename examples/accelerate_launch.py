"""Data-parallel generation over the ranks of one host, layer-wise offload, one shared host copy.

Every rank runs the whole pipeline on its own prompts (its own GPU, or several ranks on one GPU); the
transformer's weights are read once from its safetensors into one host region that all ranks of the host
map and stream from, so host memory stays about one copy of the weights whatever the number of ranks.

    # a diffusers pipeline directory (e.g. a local FLUX.1-dev snapshot), 2 ranks
    accelerate launch --num_processes 2 examples/accelerate_launch.py --pipeline /models/FLUX.1-dev \\
        --prompt "a red cat" --prompt "a blue bird" --out images/

    # no model at hand: the tiny built-in pipeline, on the CPU (accelerate's --cpu goes through mpirun;
    # --multi_gpu goes through torchrun, which this needs)
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 examples/accelerate_launch.py --demo

Each rank prints its share of the prompts, the seconds per image, and the host memory it holds (PSS:
shared pages counted once across ranks).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from accelerate import PartialState

from offload_map import dispatch_pipeline, empty_model


def pss_gb() -> float:
    """This process's proportional set size: shared pages split between the processes that map them."""
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024 / 1e9


def load(args):
    """The pipeline with its transformer on the meta device, and the weights to read it from."""
    if args.demo:
        from offload_map.demo import make_tiny_pipeline

        return make_tiny_pipeline(), None
    from diffusers import DiffusionPipeline

    root = Path(args.pipeline)
    probe = DiffusionPipeline.load_config(root)
    module, class_name = probe["transformer"]
    transformer_class = getattr(__import__(module, fromlist=[class_name]), class_name)
    transformer = empty_model(transformer_class, root / "transformer", dtype=torch.bfloat16)
    pipe = DiffusionPipeline.from_pretrained(root, transformer=transformer, torch_dtype=torch.bfloat16)
    return pipe, {"transformer": root / "transformer"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", help="a diffusers pipeline directory")
    parser.add_argument("--demo", action="store_true", help="use the tiny built-in pipeline instead")
    parser.add_argument("--prompt", action="append", default=[], help="repeatable; split between the ranks")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument(
        "--shard",
        action="store_true",
        help="each rank streams 1/N of every block over its own link; the ranks all-gather the rest "
        "(one GPU per rank; all ranks must get the same number of prompts)",
    )
    parser.add_argument("--out", default="images")
    args = parser.parse_args()
    if not args.demo and not args.pipeline:
        parser.error("pass --pipeline DIR, or --demo")
    prompts = args.prompt or ["a red cat", "a blue bird", "a green tree", "a white house"]

    # gloo: ranks exchange only Python objects, and NCCL refuses two ranks on one GPU. Run alone (no
    # launcher), there is no process group to make.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = PartialState(cpu=not torch.cuda.is_available(), **({"backend": "gloo"} if launched else {}))
    device = "cpu" if not torch.cuda.is_available() else f"cuda:{state.local_process_index % torch.cuda.device_count()}"
    pipe, weights = load(args)
    handle = dispatch_pipeline(pipe, "layerwise", device, window=args.window, weights=weights, shard_copies=args.shard)
    copy = handle.host_copy
    shared = f"shared by ranks {copy.ranks}" if copy is not None and copy.flat is not None else "private"
    print(f"rank {state.process_index}: {device}, host copy {shared}, PSS {pss_gb():.2f} GB", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with state.split_between_processes(prompts) as mine:
        for i, prompt in enumerate(mine):
            start = time.perf_counter()
            if args.demo:
                image = pipe(prompt, steps=4)
                torch.save(image, out / f"rank{state.process_index}_{i}.pt")
            else:
                image = pipe(prompt, num_inference_steps=args.steps).images[0]
                image.save(out / f"rank{state.process_index}_{i}.png")
            print(
                f"rank {state.process_index}: {prompt!r} in {time.perf_counter() - start:.1f} s, PSS {pss_gb():.2f} GB",
                flush=True,
            )
    handle.remove()
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
