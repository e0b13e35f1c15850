"""Sharded streaming across the GPUs of one host (``shard_copies=True``): every rank copies 1/N of each block over its
own link and the ranks all-gather the rest into the slot over NCCL. Checks that each rank's outputs equal its
resident run bit for bit, under ``"layerwise"``, and that each rank read only its share of the host bytes.

Usage (N GPUs)::

    torchrun --nproc_per_node N benchmarks/sharded_check.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from offload_map import dispatch_pipeline  # noqa: E402
from offload_map.demo import TinyDiT  # noqa: E402


def main() -> None:
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    torch.manual_seed(0)
    model = TinyDiT(dim=256, double=4, single=8).eval().requires_grad_(False)
    latents, t, context = torch.randn(1, 64, 4), torch.tensor(0.5), torch.randn(1, 16, 256)
    with torch.no_grad():
        reference = model.cuda()(latents.cuda(), t.cuda(), context.cuda()).cpu()
        model.cpu()
        handle = dispatch_pipeline(model, "layerwise", f"cuda:{rank}", window=2, shard_copies=True)
        outputs = [model(latents, t, context).cpu() for _ in range(4)]
    torch.cuda.synchronize()
    stats = handle.report().stats
    whole = sum(p.numel() * p.element_size() for b in [*model.double_blocks, *model.single_blocks] for p in b.parameters())
    exact = all(torch.equal(out, reference) for out in outputs)
    print(
        f"rank {rank}: bit-exact {exact}; host bytes read {stats.bytes_h2d} of {4 * whole} streamed "
        f"({stats.bytes_h2d / (4 * whole):.2f}); host copy shared by {handle.host_copy.ranks if handle.host_copy else None}",
        flush=True,
    )
    handle.remove()
    dist.destroy_process_group()
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main()
