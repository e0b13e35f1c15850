"""The layer-window runtime: learned order, on-demand fall-back, blocks of different sizes, faults."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from offload_map import dispatch_pipeline
from offload_map.demo import TinyBlock

from conftest import resident_run


class ShuffledDiT(nn.Module):
    """Runs its blocks in an order unlike their declaration, optionally repeating or skipping some."""

    _layerwise_offload_blocks_attrs = ["blocks"]

    def __init__(self, order, widths=(8, 32, 16, 64, 8)) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(8, w) for w in widths)
        self.order = list(order)

    def forward(self, x):
        context = x[:, :1]
        for i in self.order:
            x = self.blocks[i](x, context)
        return x


def _make(order, seed=0):
    torch.manual_seed(seed)
    return ShuffledDiT(order).eval().requires_grad_(False)


@pytest.mark.parametrize("window", [1, 2, 3, 4])
@pytest.mark.parametrize("order", [[4, 0, 3, 1, 2], [0, 1, 1, 2, 3, 4, 0], [2, 2, 2], [4, 3, 2, 1, 0]])
def test_learned_order_is_followed_without_on_demand_loads(target, order, window):
    model = _make(order)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        reference = resident_run(model, lambda: model(x.to(target)), target)
        handle = dispatch_pipeline(model, "layerwise", target, window=window)
        for _ in range(3):
            assert torch.equal(model(x).cpu(), reference)
    stats = handle.report().stats
    assert stats.on_demand_loads <= len(order)  # only while learning the first forward
    first = stats.on_demand_loads
    with torch.no_grad():
        model(x)
    assert handle.report().stats.on_demand_loads == first, "a forward after learning loaded on demand"
    handle.remove()


def test_departing_from_the_learned_order_warns_once_and_stays_correct(target, caplog):
    model = _make([0, 1, 2, 3, 4])
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        handle = dispatch_pipeline(model, "layerwise", target, window=2)
        model(x)
        model.order = [3, 1, 4, 0]
        reference_model = _make([3, 1, 4, 0])
        reference = resident_run(reference_model, lambda: reference_model(x.to(target)), target)
        with caplog.at_level(logging.WARNING, logger="offload_map"):
            for _ in range(2):
                assert torch.equal(model(x).cpu(), reference)
    warnings = [r for r in caplog.records if "out of the learned order" in r.message]
    assert len(warnings) == 1
    assert handle.report().stats.on_demand_loads > 0
    handle.remove()


def test_an_exception_inside_a_block_leaves_the_next_forward_correct(target):
    model = _make([0, 1, 2, 3, 4])
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        reference = resident_run(model, lambda: model(x.to(target)), target)
        handle = dispatch_pipeline(model, "layerwise", target, window=2)
        model(x)
        original = model.blocks[2]._old_forward

        def boom(*args, **kwargs):
            raise KeyboardInterrupt

        model.blocks[2]._old_forward = boom
        with pytest.raises(KeyboardInterrupt):
            model(x)
        model.blocks[2]._old_forward = original
        assert torch.equal(model(x).cpu(), reference)
        assert torch.equal(model(x).cpu(), reference)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(resident_run(model, lambda: model(x.to(target)), target), reference)


def test_streamed_blocks_refuse_to_run_with_autograd_on(target):
    model = _make([0, 1])
    handle = dispatch_pipeline(model, "layerwise", target)
    with pytest.raises(RuntimeError, match="inference only.*torch.no_grad"):
        model(torch.randn(1, 4, 8))
    handle.remove()


def test_blocks_of_different_sizes_share_slots_sized_for_the_largest(target):
    model = _make([0, 1, 2, 3, 4])
    handle = dispatch_pipeline(model, "layerwise", target, window=2)
    sizes = [e.nbytes for p, e in handle.device_map.entries.items() if p.startswith("blocks.")]
    assert len(set(sizes)) > 1
    assert handle.report().slot_bytes >= 2 * max(sizes)
    assert handle.report().slot_bytes < 2 * max(sizes) + 2 * 512 * 16
    handle.remove()


def test_non_contiguous_and_mixed_dtype_tensors_keep_strides_and_values(target):
    model = _make([0, 1, 2])
    block = model.blocks[1]
    block.mlp[0].weight = nn.Parameter(block.mlp[0].weight.detach().t().contiguous().t(), requires_grad=False)
    block.register_buffer("codes", torch.arange(6, dtype=torch.float16).reshape(2, 3))
    stride = block.mlp[0].weight.stride()
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        reference = resident_run(model, lambda: model(x.to(target)), target)
        handle = dispatch_pipeline(model, "layerwise", target, window=1)
        assert torch.equal(model(x).cpu(), reference)
        assert block.mlp[0].weight.stride() == stride
        assert block.codes.dtype == torch.float16
    handle.remove()
    assert block.mlp[0].weight.stride() == stride
    assert torch.equal(block.codes, torch.arange(6, dtype=torch.float16).reshape(2, 3))


class TiedBlock(nn.Linear):
    """Uses its buffers inside its own forward: a streamed block's tensors are on the device only then."""

    def forward(self, x):
        return super().forward(x) * self.freqs + self.bias_grid[0]


class TiedDiT(nn.Module):
    """Blocks that share a buffer with the DiT, hold a broadcast (stride-0) buffer, and a tied output weight."""

    _layerwise_offload_blocks_attrs = ["blocks"]

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        shared = torch.linspace(0.5, 1.5, 8)
        self.register_buffer("freqs", shared)
        self.blocks = nn.ModuleList(TiedBlock(8, 8) for _ in range(3))
        for block in self.blocks:
            block.register_buffer("freqs", shared)
            block.register_buffer("bias_grid", torch.arange(8.0).expand(4, 8))
        self.out = nn.Linear(8, 8)
        self.out.weight = self.blocks[1].weight

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.out(x * self.freqs)


@pytest.mark.parametrize("strategy", ["model", "layerwise"])
def test_shared_tied_and_broadcast_tensors_stay_one_tensor_and_bit_exact(target, strategy):
    model, twin = (TiedDiT().eval().requires_grad_(False) for _ in range(2))
    x = torch.randn(2, 8)
    with torch.no_grad():  # module.to() would untie buffers and densify the broadcast one: the twin goes there
        reference = resident_run(twin, lambda: twin(x.to(target)), target)
        handle = dispatch_pipeline(model, strategy, target, window=1)
        for _ in range(2):
            assert torch.equal(model(x).cpu(), reference)
    handle.remove()
    assert model.blocks[0].freqs is model.blocks[2].freqs is model.freqs
    assert model.out.weight is model.blocks[1].weight
    assert model.blocks[0].bias_grid.stride() == (0, 1)


def test_a_tensor_shared_by_two_streamed_blocks_is_refused_with_the_fix():
    model = TiedDiT()
    model.out.weight = nn.Parameter(torch.randn(8, 8))
    model.blocks[2].weight = model.blocks[0].weight
    with pytest.raises(ValueError, match=r"blocks.0.weight is shared with 'blocks.2'.*Place one of them 'gpu'"):
        dispatch_pipeline(model, "layerwise", "cpu")
    assert not hasattr(model.blocks[0], "_hf_hook")


@pytest.mark.parametrize("strategy", ["layerwise", "model"])
def test_weights_loaded_while_dispatched_are_used_after_refresh(target, strategy):
    model, changed = _make([0, 1, 2, 3, 4]), _make([0, 1, 2, 3, 4], seed=1)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        expected = resident_run(changed, lambda: changed(x.to(target)), target)
        handle = dispatch_pipeline(model, strategy, target, window=2)
        model(x)  # leaves the first blocks of the next step in slots (or the model loaded)
        model.load_state_dict(changed.state_dict())
        handle.refresh()
        for _ in range(2):
            assert torch.equal(model(x).cpu(), expected)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), changed.state_dict().values()))


@pytest.mark.parametrize("strategy", ["layerwise", "model"])
def test_a_parameter_replaced_while_dispatched_keeps_its_new_value_through_refresh_and_remove(target, strategy):
    model, changed = _make([0, 1, 2, 3, 4]), _make([0, 1, 2, 3, 4])
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        linear = changed.blocks[1].mlp[0]
        linear.weight = nn.Parameter(linear.weight * 0.5)
        expected = resident_run(changed, lambda: changed(x.to(target)), target)
        handle = dispatch_pipeline(model, strategy, target, window=2)
        model(x)
        model.blocks[1].mlp[0].weight = nn.Parameter(linear.weight.clone())  # a new Parameter
        with pytest.raises(RuntimeError, match=r"modules changed since dispatch .*parameters replaced under their names"):
            model(x)
        handle.refresh()  # the modules changed: dispatched again, with the new value
        assert torch.equal(model(x).cpu(), expected)
    handle.remove()
    assert torch.equal(model.blocks[1].mlp[0].weight, linear.weight)


def test_refresh_refuses_a_tensor_that_changed_shape():
    model = _make([0, 1])
    handle = dispatch_pipeline(model, "layerwise", "cpu")
    model.blocks[1].scale = torch.ones(3)
    with pytest.raises(ValueError, match=r"blocks.1.scale changed from \(8,\).*dispatch again"):
        handle.refresh()
    handle.remove()


@pytest.mark.parametrize("strategy", ["layerwise", "model"])
def test_many_steps_leak_nothing_and_stay_exact(target, strategy):
    import gc

    model = _make([0, 1, 2, 3, 4])
    x = torch.randn(1, 4, 8)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter))

    with torch.no_grad():
        reference = resident_run(model, lambda: model(x.to(target)), target)
        handle = dispatch_pipeline(model, strategy, target, window=2)
        for _ in range(3):
            out = model(x)
        before = live_tensors()
        for _ in range(200):
            out = model(x)
        assert live_tensors() == before
        assert torch.equal(out.cpu(), reference)
    handle.remove()


def _views_host(tensor: torch.Tensor, buffers) -> bool:
    return any(b.flat.data_ptr() <= tensor.data_ptr() < b.flat.data_ptr() + b.nbytes for b in buffers)


def test_between_forwards_streamed_blocks_view_their_host_buffers(target):
    # The next step's first blocks are already loading, but only a block's own forward sees its slot.
    model = _make([0, 1, 2, 3, 4])
    handle = dispatch_pipeline(model, "layerwise", target, window=2)
    buffers = handle.runtime.host_buffers
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(1, 4, 8))
            elsewhere = [n for n, t in model.blocks.state_dict(keep_vars=True).items() if not _views_host(t, buffers)]
            assert not elsewhere, f"block tensors outside their host buffers between forwards: {elsewhere}"
    handle.remove()


def test_a_block_that_raises_leaves_no_profiler_range_open(target):
    model = _make([0, 1, 2, 3, 4])
    handle = dispatch_pipeline(model, "layerwise", target, window=2)
    original = model.blocks[2]._old_forward
    x = torch.randn(1, 4, 8)
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(x)
        model.blocks[2]._old_forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("block failed"))
        with pytest.raises(RuntimeError, match="block failed"):
            model(x)
        model.blocks[2]._old_forward = original
        with torch.profiler.record_function("user::after"):
            model(x)
    handle.remove()
    after = next(e for e in prof.events() if e.name == "user::after").time_range
    ours = [e for e in prof.events() if e.name.startswith("offload_map::")]
    assert ours, "the loads are profiler ranges"
    crossing = [e.name for e in ours if e.time_range.start < after.start < e.time_range.end]
    assert not crossing, f"ranges still open when the next user range began: {crossing}"
