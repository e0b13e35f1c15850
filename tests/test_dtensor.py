"""DTensor parameters (HSDP, tensor parallelism): each rank offloads its local shard; the DTensors, their mesh and
placements stay, outputs equal the resident run bit for bit, and remove() restores every shard exactly.

Two ranks on a gloo device mesh of the CPU, spawned by the test; each writes what it saw to a file."""

from __future__ import annotations

import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from offload_map import dispatch_pipeline


class ShardedBlock(nn.Module):
    def __init__(self, mesh, dim: int = 8) -> None:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        super().__init__()
        linear = nn.Linear(dim, dim)
        self.weight = nn.Parameter(distribute_tensor(linear.weight.detach(), mesh, [Shard(0)]), requires_grad=False)
        self.bias = nn.Parameter(distribute_tensor(linear.bias.detach(), mesh, [Replicate()]), requires_grad=False)

    def forward(self, x):
        return torch.tanh(nn.functional.linear(x, self.weight, self.bias))


class ShardedDiT(nn.Module):
    _layerwise_offload_blocks_attrs = ["blocks"]

    def __init__(self, mesh) -> None:
        super().__init__()
        self.mesh = mesh
        self.blocks = nn.ModuleList(ShardedBlock(mesh) for _ in range(4))

    def forward(self, x):
        from torch.distributed.tensor import DTensor, Replicate

        x = DTensor.from_local(x, self.mesh, [Replicate()])
        for block in self.blocks:
            x = block(x)
        return x.full_tensor()


def _shards(model) -> dict:
    return {name: (type(p).__name__, p.placements, p._local_tensor.clone()) for name, p in model.named_parameters()}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model = ShardedDiT(mesh).eval()
        x = torch.randn(2, 8)
        before = _shards(model)
        with torch.no_grad():
            reference = model(x)
            seen = {}
            for strategy, window in (("layerwise", 1), ("layerwise", 2), ("model", 2)):
                handle = dispatch_pipeline(model, strategy, "cpu", window=window)
                outputs = [model(x) for _ in range(3)]
                seen[f"{strategy}-{window}"] = all(torch.equal(out, reference) for out in outputs)
                seen[f"{strategy}-{window}-dtensor"] = all(type(p).__name__ == "DTensor" for p in model.parameters())
                handle.remove()
        after = _shards(model)
        seen["restored"] = before.keys() == after.keys() and all(
            before[k][:2] == after[k][:2] and torch.equal(before[k][2], after[k][2]) for k in before
        )
        seen["local_shape"] = tuple(model.blocks[0].weight._local_tensor.shape)
        torch.save(seen, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_dtensor_shards_stream_bit_exactly_and_are_restored(tmp_path):
    init = f"file://{tempfile.mktemp(dir=tmp_path)}"
    mp.spawn(_worker, args=(2, init, str(tmp_path / "seen")), nprocs=2)
    for rank in range(2):
        seen = torch.load(tmp_path / f"seen.{rank}")
        assert seen.pop("local_shape") == (4, 8), "each rank holds its half of the weight"
        assert all(seen.values()), seen
