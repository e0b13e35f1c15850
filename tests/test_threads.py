"""Two threads calling one dispatched pipeline: the second is refused with a clear error while the first
runs, the first finishes correctly, and the pipeline keeps working from any thread afterwards."""

from __future__ import annotations

import threading

import pytest
import torch

from offload_map import dispatch_pipeline
from offload_map.demo import make_tiny_pipeline
from conftest import resident_run


@pytest.mark.parametrize("strategy", ["layerwise", "model"])
def test_a_second_thread_is_refused_while_the_first_runs(target, strategy):
    pipe = make_tiny_pipeline()
    reference = resident_run(pipe, lambda: pipe("threads", steps=2), target)
    handle = dispatch_pipeline(pipe, strategy, target)
    inside, release = threading.Event(), threading.Event()
    block = pipe.transformer.double_blocks[1]
    original = block._old_forward if hasattr(block, "_old_forward") else block.forward

    def slow(*args, **kwargs):  # holds the first thread inside the DiT
        inside.set()
        assert release.wait(30)
        return original(*args, **kwargs)

    if hasattr(block, "_old_forward"):
        block._old_forward = slow
    else:
        block.forward = slow
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", pipe("threads", steps=2)))
    first.start()
    assert inside.wait(30)
    with pytest.raises(RuntimeError, match="already running on another thread"):
        pipe.transformer(torch.randn(1, 4, 4), torch.tensor(0.5), torch.randn(1, 3, 32))
    release.set()
    first.join(30)
    assert torch.equal(results["first"].cpu(), reference)
    if hasattr(block, "_old_forward"):
        block._old_forward = original
    else:
        del block.forward
    out = []
    later = threading.Thread(target=lambda: out.append(pipe("threads", steps=2)))
    later.start()
    later.join(30)
    assert torch.equal(out[0].cpu(), reference)
    handle.remove()
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks


def test_a_forward_that_raised_does_not_lock_the_pipeline_to_its_thread(target):
    pipe = make_tiny_pipeline()
    reference = resident_run(pipe, lambda: pipe("raise", steps=2), target)
    handle = dispatch_pipeline(pipe, "layerwise", target)
    with pytest.raises(TypeError):
        pipe.transformer("not a tensor", torch.tensor(0.5), torch.randn(1, 3, 32))
    out = []
    other = threading.Thread(target=lambda: out.append(pipe("raise", steps=2)))
    other.start()
    other.join(30)
    assert out and torch.equal(out[0].cpu(), reference)
    handle.remove()


def test_a_forward_interrupted_by_ctrl_c_does_not_lock_out_other_threads(target):
    pipe = make_tiny_pipeline()
    reference = resident_run(pipe, lambda: pipe("interrupt", steps=2), target)
    handle = dispatch_pipeline(pipe, "layerwise", target)
    block = pipe.transformer.double_blocks[0]
    original = block._old_forward

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    block._old_forward = interrupted
    with pytest.raises(KeyboardInterrupt):
        pipe("interrupt", steps=2)
    block._old_forward = original
    out = []
    other = threading.Thread(target=lambda: out.append(pipe("interrupt", steps=2)))
    other.start()
    other.join(30)
    assert out and torch.equal(out[0].cpu(), reference)
    handle.remove()
