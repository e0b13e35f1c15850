"""The benchmark scripts' own logic that decides what a GPU run records (the runs themselves need a GPU)."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import cold_start  # noqa: E402
import pipeline_time  # noqa: E402

import step_time  # noqa: E402


def test_pipeline_time_skips_a_strategy_only_for_the_memory_it_needs_beyond_the_built_pipeline(monkeypatch):
    # The H200 run of Wan2.2: 70.9 GB of weights built, 62 GB still available. A layer-wise row needs 1.1x the
    # weights in all, so 7 GB more: it runs (it was skipped, the pipeline's own 70.9 GB counted twice).
    weights, available = 70_900_000_000, 62_000_000_000
    monkeypatch.setattr(pipeline_time, "read_status_bytes", lambda *_: available)
    assert pipeline_time.host_shortfall("layerwise", weights) is None
    assert pipeline_time.host_shortfall("auto-8GiB", weights) is None
    skipped = pipeline_time.host_shortfall("diffusers-group", weights)  # 2.2x: 85 GB beyond the pipeline
    assert skipped == "skipped: needs about 85 GB of host memory beyond the pipeline, 62 GB available"


def test_step_time_records_no_coded_blocks_where_the_model_fits_its_budget_whole():
    # auto-12GiB-lossless on a model under 12 GiB: nothing streams, so the report has no coded line.
    ctx = SimpleNamespace(coded=SimpleNamespace(coded=None))
    assert step_time.coded_summary(ctx) == {}
    assert ctx.coded is None


def test_pipeline_time_gives_each_component_the_peak_reached_while_it_ran(monkeypatch):
    # Which phase sets the peak (a DiT's or a VAE's decode) is what tells whether a budget's plan is at fault.
    import torch
    from torch import nn

    state = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *_: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *_: state.update(peak=0))

    class Uses(nn.Module):
        def __init__(self, nbytes: int) -> None:
            super().__init__()
            self.nbytes = nbytes

        def forward(self) -> None:
            state["peak"] = max(state["peak"], self.nbytes)

    vae = nn.Module()
    vae.decoder = Uses(7)  # diffusers' decode() runs the decoder, not the VAE's forward
    pipe = SimpleNamespace(components={"text_encoder": Uses(3), "transformer": Uses(5), "vae": vae, "tokenizer": object()})
    with pipeline_time.PhasePeaks(pipe) as phases:
        for name in ["text_encoder", "transformer", "transformer"]:
            pipe.components[name]()
        vae.decoder()
    assert phases.peaks == {"before": 0, "text_encoder": 3, "transformer": 5, "vae": 7} and phases.peak == 7
    assert not pipe.components["transformer"]._forward_pre_hooks  # the hooks are gone


def test_cold_start_tables_a_failed_phase_and_the_phases_after_it():
    # A failed phase's row holds only its phase and error: the table raised KeyError on it, so a stage lost the
    # rows after it, and h200_checks.sh left its checkpoint under /tmp.
    rows = [
        {
            "phase": "offload_map",
            "error": "Traceback (most recent call last):\n...\ntorch.OutOfMemoryError: CUDA out of memory\n",
        },
        {"phase": "offload_map-lossless", "ready_s": 7.4, "step_s": 0.313, "rss_after_gb": 18.2, "rss_peak_gb": 20.1},
    ]
    lines = cold_start.table(rows, 23.8).splitlines()
    assert "| offload_map | failed | | | | torch.OutOfMemoryError: CUDA out of memory |" in lines
    assert "| offload_map-lossless | 7.40 | 0.313 | 18.2 | 20.1 |  |" in lines
