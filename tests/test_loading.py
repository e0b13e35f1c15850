"""Loading safetensors straight into place: a DiT built on the meta device, its weights read into their
pinned blocks (or onto the device), outputs bit-identical to the model loaded the usual way; every bad
checkpoint refused with a clear error and nothing left allocated."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from diffusers import FluxTransformer2DModel

from offload_map import CheckpointError, dispatch_pipeline, empty_model
from offload_map.loading.checkpoint import Checkpoint

from conftest import resident_run
from tiny_pipelines import make_flux_pipeline, run_flux


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny Flux pipeline, its resident output, and its transformer saved three ways."""
    pipe = make_flux_pipeline()
    root = tmp_path_factory.mktemp("ckpt")
    pipe.transformer.save_pretrained(root / "single")
    pipe.transformer.save_pretrained(root / "sharded", max_shard_size="100KB")
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1
    assert list((root / "sharded").glob("*.index.json"))
    return pipe, root


@pytest.fixture
def meta_pipe(saved):
    pipe, root = saved
    original = pipe.transformer
    pipe.transformer = empty_model(FluxTransformer2DModel, root / "single")
    yield pipe, root, original
    handle = getattr(pipe, "_offload_map_handle", None)
    if handle is not None:
        handle.remove()
    pipe.transformer = original


def _is_meta(module) -> bool:
    return all(p.is_meta for p in module.parameters())


@pytest.mark.parametrize("layout", ["single", "sharded", "file"])
@pytest.mark.parametrize("strategy", ["layerwise", "model", "none"])
def test_loaded_in_place_runs_bit_identical_to_the_usual_load(meta_pipe, target, strategy, layout):
    pipe, root, original = meta_pipe
    pipe.transformer, loaded = original, pipe.transformer
    reference = resident_run(pipe, lambda: run_flux(pipe), target)
    pipe.transformer = loaded
    assert _is_meta(pipe.transformer)
    path = root / "single" / "diffusion_pytorch_model.safetensors" if layout == "file" else root / layout
    handle = dispatch_pipeline(pipe, strategy, target, weights={"transformer": path})
    assert not any(p.is_meta for p in pipe.transformer.parameters())
    for _ in range(2):
        assert torch.equal(run_flux(pipe).cpu(), reference)
    handle.remove()
    for (name, mine), theirs in zip(pipe.transformer.state_dict().items(), original.state_dict().values()):
        assert mine.device.type == "cpu" and torch.equal(mine, theirs), name


def test_a_float32_checkpoint_loads_at_the_model_dtype(meta_pipe, target):
    pipe, root, original = meta_pipe
    pipe.transformer = empty_model(FluxTransformer2DModel, root / "single", dtype=torch.bfloat16)
    handle = dispatch_pipeline(pipe, "layerwise", target, weights={"transformer": root / "single"})
    handle.remove()
    for (name, mine), theirs in zip(pipe.transformer.state_dict().items(), original.state_dict().values()):
        assert mine.dtype == torch.bfloat16 and torch.equal(mine, theirs.to(torch.bfloat16)), name


def _corrupt(root, tmp_path, how: str):
    src = root / "single"
    dst = tmp_path / how
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    data = (src / "diffusion_pytorch_model.safetensors").read_bytes()
    if how == "truncated":
        data = data[: len(data) - 1000]
    elif how == "garbage-header":
        data = struct.pack("<Q", 40) + b"{not json at all, just some bytes....}" + data[48:]
    elif how == "huge-header":
        data = struct.pack("<Q", 2**62) + data[8:]
    elif how == "bad-shape":  # same header length: one digit of the first shape changes
        at = data.index(b'"shape":[') + len(b'"shape":[')
        data = data[:at] + (b"8" if data[at : at + 1] == b"9" else b"9") + data[at + 1 :]
    if how == "missing-shard":
        sharded = root / "sharded"
        for f in sharded.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        next(dst.glob("*-00002-of-*.safetensors")).unlink()
        return dst
    if how == "pickle":
        (dst / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
        return dst
    (dst / "diffusion_pytorch_model.safetensors").write_bytes(data)
    return dst


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "not fully covered.*corrupt or truncated"),
        ("garbage-header", "invalid JSON in header.*corrupt or truncated"),
        ("huge-header", "header too large.*corrupt or truncated"),
        ("bad-shape", "invalid shape, data type, or offset.*corrupt or truncated"),
        ("missing-shard", "lists shard\\(s\\) that do not exist"),
        ("pickle", "pickle-based"),
    ],
)
def test_a_bad_checkpoint_is_refused_and_nothing_is_allocated(meta_pipe, target, tmp_path, how, message):
    pipe, root, _ = meta_pipe
    bad = _corrupt(root, tmp_path, how)
    with pytest.raises(CheckpointError, match=message):
        dispatch_pipeline(pipe, "layerwise", target, weights={"transformer": bad})
    assert _is_meta(pipe.transformer) and not hasattr(pipe, "_offload_map_handle")
    assert not any(hasattr(m, "_hf_hook") for m in pipe.transformer.modules())


def test_a_pickle_file_path_is_never_opened(tmp_path):
    path = tmp_path / "model.bin"  # does not even exist: refused by name
    with pytest.raises(CheckpointError, match="only reads safetensors"):
        Checkpoint(path)


def test_a_config_that_does_not_match_the_checkpoint_is_refused(saved, target, tmp_path):
    pipe, root = saved
    config = json.loads((root / "single" / "config.json").read_text())
    config["joint_attention_dim"] *= 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    original = pipe.transformer
    pipe.transformer = empty_model(FluxTransformer2DModel, tmp_path)
    try:
        with pytest.raises(CheckpointError, match="the model's config does not match the checkpoint"):
            dispatch_pipeline(pipe, "layerwise", target, weights={"transformer": root / "single"})
        assert _is_meta(pipe.transformer)
    finally:
        pipe.transformer = original


def test_a_read_failing_midway_leaves_every_tensor_on_the_meta_device(meta_pipe, target, monkeypatch):
    pipe, root, _ = meta_pipe
    calls = {"n": 0}
    real = Checkpoint.read_into

    def flaky(self, name, out):
        calls["n"] += 1
        if calls["n"] == 40:
            raise CheckpointError("simulated: disk went away")
        real(self, name, out)

    monkeypatch.setattr(Checkpoint, "read_into", flaky)
    with pytest.raises(CheckpointError, match="disk went away"):
        dispatch_pipeline(pipe, "layerwise", target, weights={"transformer": root / "single"})
    assert _is_meta(pipe.transformer) and not hasattr(pipe, "_offload_map_handle")
    assert not any(hasattr(m, "_hf_hook") for m in pipe.transformer.modules())


def test_weights_must_match_meta_components(meta_pipe, target):
    pipe, root, _ = meta_pipe
    with pytest.raises(CheckpointError, match="on the meta device .* and no checkpoint; pass weights="):
        dispatch_pipeline(pipe, "layerwise", target)
    with pytest.raises(CheckpointError, match="not components of the pipeline"):
        dispatch_pipeline(pipe, "layerwise", target, weights={"transformer": root / "single", "unet": root})
    with pytest.raises(CheckpointError, match="already holds its weights"):
        dispatch_pipeline(pipe, "layerwise", target, weights={"transformer": root / "single", "vae": root / "single"})
    with pytest.raises(CheckpointError, match="does not exist"):
        dispatch_pipeline(pipe, "layerwise", target, weights={"transformer": root / "nowhere"})
    assert _is_meta(pipe.transformer)


def test_a_lone_dit_takes_one_path(saved, target):
    pipe, root = saved
    inputs = dict(
        hidden_states=torch.randn(1, 16, pipe.transformer.config.in_channels, generator=torch.Generator().manual_seed(0)),
        encoder_hidden_states=torch.randn(1, 8, pipe.transformer.config.joint_attention_dim),
        pooled_projections=torch.randn(1, pipe.transformer.config.pooled_projection_dim),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
    )
    if pipe.transformer.config.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    with torch.no_grad():
        reference = resident_run(
            pipe.transformer, lambda: pipe.transformer(**{k: v.to(target) for k, v in inputs.items()}).sample, target
        )
        model = empty_model(FluxTransformer2DModel, root / "sharded")
        handle = dispatch_pipeline(model, "layerwise", target, weights=str(root / "sharded"))
        assert torch.equal(model(**{k: v.to(target) for k, v in inputs.items()}).sample.cpu(), reference)
    handle.remove()


def _write_safetensors(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    "header, message",
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            "invalid offset for tensor `b`",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "invalid offset for tensor `a`"),
        ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, "invalid JSON in header"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "invalid JSON in header"),
    ],
)
def test_headers_that_safetensors_itself_would_refuse_are_refused(tmp_path, header, message):
    path = tmp_path / "bad.safetensors"
    _write_safetensors(path, header, bytes(16))
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(path)


def test_a_refresh_whose_dispatch_fails_leaves_the_pipeline_removed_and_usable(meta_pipe, target, monkeypatch):
    from offload_map.runtime import slots

    pipe, root, original = meta_pipe
    pipe.transformer = original
    reference = resident_run(pipe, lambda: run_flux(pipe), target)
    handle = dispatch_pipeline(pipe, "layerwise", target)
    pipe.transformer.transformer_blocks[0].extra = torch.nn.Linear(2, 2)  # the modules changed

    def no_memory(*args):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(slots.SlotPool, "__init__", no_memory)  # dispatching again fails
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        handle.refresh()
    monkeypatch.undo()
    assert not hasattr(pipe, "_offload_map_handle")
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()
    del pipe.transformer.transformer_blocks[0].extra
    handle = dispatch_pipeline(pipe, "layerwise", target)
    assert torch.equal(run_flux(pipe).cpu(), reference)
    handle.remove()


def test_several_indexes_are_refused_unless_one_is_named(saved, tmp_path):
    _, root = saved
    for f in (root / "sharded").iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    index = next(tmp_path.glob("*.index.json"))
    (tmp_path / index.name.replace("model.", "model.fp16.")).write_text(index.read_text())
    with pytest.raises(CheckpointError, match="several indexes"):
        Checkpoint(tmp_path)
    assert Checkpoint(index).tensors.keys() == Checkpoint(root / "sharded").tensors.keys()


@pytest.mark.parametrize(
    "dtype",
    [torch.uint16, torch.uint32, torch.uint64, torch.complex64, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.bfloat16],
)
def test_every_dtype_safetensors_stores_is_read(tmp_path, dtype):
    from safetensors.torch import save_file

    tensor = torch.arange(12).reshape(3, 4).to(dtype)
    save_file({"t": tensor}, tmp_path / "w.safetensors")
    out = torch.empty(3, 4, dtype=dtype)
    Checkpoint(tmp_path / "w.safetensors").read_into("t", out)
    assert torch.equal(out.view(torch.uint8), tensor.view(torch.uint8))


def test_a_tied_tensor_is_read_under_whichever_of_its_names_the_checkpoint_stores(tmp_path, target):
    from safetensors.torch import save_file
    from torch import nn

    class Tied(nn.Module):
        _layerwise_offload_blocks_attrs = ["blocks"]

        def __init__(self) -> None:
            super().__init__()
            self.first, self.blocks, self.second = nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4)]), nn.Linear(4, 4)
            self.second.weight = self.first.weight

        def forward(self, x):
            return self.second(self.blocks[0](self.first(x)))

    torch.manual_seed(0)
    model, x = Tied(), torch.randn(2, 4)
    reference = resident_run(model, lambda: model(x.to(target)), target)
    # As transformers saves tied weights: one name, here not the one collection meets first.
    stored = {k: v for k, v in model.state_dict().items() if k != "first.weight"}
    save_file(stored, tmp_path / "w.safetensors")
    with torch.device("meta"):
        empty = Tied()
    handle = dispatch_pipeline(empty, "model", target, weights=tmp_path / "w.safetensors")
    with torch.no_grad():
        assert torch.equal(empty(x.to(target)).cpu(), reference)
    assert empty.first.weight is empty.second.weight
    handle.remove()


def test_empty_model_ties_what_transformers_ties_on_load(tmp_path, target):
    from transformers import T5EncoderModel

    from tiny_pipelines import make_flux_pipeline

    encoder = make_flux_pipeline().text_encoder_2
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        reference = resident_run(encoder, lambda: encoder(ids.to(target)).last_hidden_state, target)
    encoder.save_pretrained(tmp_path)  # stores ``shared.weight`` only: the input embedding is tied to it
    model = empty_model(T5EncoderModel, tmp_path)
    assert model.shared.weight is model.encoder.embed_tokens.weight
    handle = dispatch_pipeline(model, "model", target, weights=tmp_path)
    with torch.no_grad():
        assert torch.equal(model(ids.to(target)).last_hidden_state.cpu(), reference)
    handle.remove()
