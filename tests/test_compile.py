"""torch.compile with offload: regional compilation (diffusers' ``compile_repeated_blocks``) before or after
dispatch. The hooks stay out of the graphs, outputs equal eager, and nothing recompiles after warm-up.

CI uses the ``aot_eager`` backend (the graphs dynamo captures and AOT autograd traces, without code
generation, so the math is eager's and the comparison is exact); the GPU benchmark uses inductor
(``benchmarks/step_time.py --strategies layerwise-w2-compiled``)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from offload_map import dispatch_pipeline

from conftest import resident_run
from tiny_pipelines import make_flux_pipeline, run_flux


@pytest.mark.parametrize("strategy", ["layerwise", "model"])
@pytest.mark.parametrize("order", ["compile-then-dispatch", "dispatch-then-compile"])
def test_regional_compile_with_offload_matches_eager_and_does_not_recompile(target, strategy, order):
    torch._dynamo.reset()
    pipe = make_flux_pipeline()
    reference = resident_run(pipe, lambda: run_flux(pipe), target)
    if order == "compile-then-dispatch":
        pipe.transformer.compile_repeated_blocks(backend="aot_eager")
    handle = dispatch_pipeline(pipe, strategy, target)
    if order == "dispatch-then-compile":
        pipe.transformer.compile_repeated_blocks(backend="aot_eager")
    assert torch.equal(run_flux(pipe).cpu(), reference)  # warm-up: compiles each block type once
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            assert torch.equal(run_flux(pipe).cpu(), reference)
    handle.remove()
    torch._dynamo.reset()
