"""Two threads calling one dispatched pipeline: the second is refused with a clear error while the first
runs, the first finishes correctly, and the pipeline keeps working from any thread afterwards."""

from __future__ import annotations

import threading

import pytest
import torch

from offload_map import dispatch_pipeline
from offload_map.demo import make_tiny_pipeline

from conftest import resident_run


def on_another_thread(call):
    """``call()`` run on a thread of its own; its result (``None`` if it raised)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(call()))
    thread.start()
    thread.join(30)
    return out[0] if out else None


@pytest.mark.parametrize("strategy", ["layerwise", "model"])
def test_a_second_thread_is_refused_while_the_first_runs(target, strategy):
    pipe = make_tiny_pipeline()
    reference = resident_run(pipe, lambda: pipe("threads", steps=2), target)
    handle = dispatch_pipeline(pipe, strategy, target)
    inside, release = threading.Event(), threading.Event()
    block = pipe.transformer.double_blocks[1]
    attr = "_old_forward" if hasattr(block, "_old_forward") else "forward"  # streamed (hooked) or inside a pinned DiT
    original = getattr(block, attr)

    def slow(*args, **kwargs):  # holds the first thread inside the DiT
        inside.set()
        assert release.wait(30)
        return original(*args, **kwargs)

    setattr(block, attr, slow)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", pipe("threads", steps=2)))
    first.start()
    assert inside.wait(30)
    with pytest.raises(RuntimeError, match="already running on another thread"):
        pipe.transformer(torch.randn(1, 4, 4), torch.tensor(0.5), torch.randn(1, 3, 32))
    release.set()
    first.join(30)
    assert torch.equal(results["first"].cpu(), reference)
    setattr(block, attr, original)
    out = on_another_thread(lambda: pipe("threads", steps=2))
    assert out is not None and torch.equal(out.cpu(), reference)
    handle.remove()
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks


def test_a_forward_that_raised_does_not_lock_the_pipeline_to_its_thread(target):
    pipe = make_tiny_pipeline()
    reference = resident_run(pipe, lambda: pipe("raise", steps=2), target)
    handle = dispatch_pipeline(pipe, "layerwise", target)
    with pytest.raises(TypeError):
        pipe.transformer("not a tensor", torch.tensor(0.5), torch.randn(1, 3, 32))
    out = on_another_thread(lambda: pipe("raise", steps=2))
    assert out is not None and torch.equal(out.cpu(), reference)
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
    out = on_another_thread(lambda: pipe("interrupt", steps=2))
    assert out is not None and torch.equal(out.cpu(), reference)
    handle.remove()
