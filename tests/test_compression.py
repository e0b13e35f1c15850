"""``compression="lossless"``: streamed blocks kept coded in host memory, decoded on the device, outputs bit-exact.

CPU tests run the whole path with the torch decoder (``SyncOrdering``); the ``cuda`` tests check the Triton
kernel against it and the stream order of copy, decode and compute with delays injected.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from offload_map import DeviceMap, compile_device_map, dispatch_pipeline
from offload_map.runtime import codec, codec_kernel
from offload_map.runtime.coded_host import PIECE, CodedHost
from offload_map.runtime.fp8_host import quantized, upcast
from offload_map.runtime.slots import Staging
from offload_map.runtime.streams import SyncOrdering

from conftest import assert_no_host_sync, resident_run
from tiny_pipelines import make_flux_pipeline, run_flux

DIM = 256


class Block(nn.Module):
    """Two linears and a norm (bf16 weights ~ N(0, 0.02), as trained ones are)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(DIM, 2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        for linear in (self.up, self.down):
            nn.init.normal_(linear.weight, std=0.02)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class DiT(nn.Module):
    _layerwise_offload_blocks_attrs = ["blocks"]

    def __init__(self, n: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def make_dit(seed: int = 0, dtype=torch.bfloat16) -> DiT:
    torch.manual_seed(seed)
    return DiT().eval().requires_grad_(False).to(dtype)


def _input(dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(4, 8, DIM, generator=torch.Generator().manual_seed(7)).to(dtype)


def _reference(seed: int, target: str, dtype=torch.bfloat16) -> torch.Tensor:
    model = make_dit(seed, dtype)
    with torch.inference_mode():
        return resident_run(model, lambda: model(_input(dtype).to(target)), target)


@pytest.mark.parametrize("window", [1, 2, 3])
@torch.inference_mode()
def test_coded_blocks_give_the_resident_output_bit_for_bit(window, target):
    model, x = make_dit(), _input().to(target)
    reference = _reference(0, target)
    handle = dispatch_pipeline(model, "layerwise", target, window=window, compression="lossless")
    assert all(torch.equal(model(x).cpu(), reference) for _ in range(3))
    coded = handle.report().coded
    assert (coded.blocks, coded.coded) == (5, 5)
    assert 0.70 < coded.coded_bytes / coded.raw_bytes < 0.80
    # What crossed the link is the code, not the raw bytes (the blocks are alike: their codes nearly so).
    stats = handle.report().stats
    assert stats.bytes_h2d / stats.block_loads == pytest.approx(coded.coded_bytes / 5, rel=0.01)
    handle.remove()
    assert torch.equal(model.to(target)(x).cpu(), reference)  # restored bit for bit


@torch.inference_mode()
def test_kept_parts_and_whole_kept_blocks_are_decoded_too(target):
    model, x = make_dit(), _input().to(target)
    reference = _reference(0, target)
    handle = dispatch_pipeline(model, "layerwise", target, window=2, compression="lossless")
    ring = handle.runtime.rings[""]
    kept = {unit.path: unit.split_points()[0] for unit in ring.units[::2]}
    kept[ring.units[1].path] = ring.units[1].nbytes
    handle.runtime.set_residency("", kept, 2)
    assert all(torch.equal(model(x).cpu(), reference) for _ in range(3))
    handle.remove()


@torch.inference_mode()
def test_a_budget_plans_with_coded_blocks_and_stays_exact(target):
    model, x = make_dit(), _input().to(target)
    reference = _reference(0, target)
    block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    budget = 7 * block // 2  # of 5 blocks, with two staging buffers of about 0.71 of a block each
    handle = dispatch_pipeline(model, "auto", target, gpu_budget=budget, compression="lossless")
    assert all(torch.equal(model(x).cpu(), reference) for _ in range(4))
    assert handle.device_map.compression == "lossless"  # the planner's maps keep it
    assert handle.report().coded.coded == 5
    # The plan leaves room for the staging buffers the coded copies go through.
    ring = handle.runtime.rings[""]
    staging = ring.staging_device_bytes
    assert staging > 0 and handle.plans[""].memory + staging <= budget
    handle.remove()


@torch.inference_mode()
def test_fp16_blocks_keep_the_high_bytes_mantissa_bits_raw_and_come_back_bit_for_bit(target):
    model, x = make_dit(dtype=torch.float16), _input(torch.float16).to(target)
    reference = _reference(0, target, torch.float16)
    handle = dispatch_pipeline(model, "layerwise", target, window=2, compression="lossless")
    units = handle.runtime.rings[""].units
    assert all(unit.coded is not None and {p.raw_bits for p in unit.coded.pieces} == {2} for unit in units)
    assert all(torch.equal(model(x).cpu(), reference) for _ in range(2))
    coded = handle.report().coded
    assert coded.coded == 5 and coded.coded_bytes < 0.92 * coded.raw_bytes
    handle.remove()


@torch.inference_mode()
def test_blocks_that_do_not_compress_stream_raw_and_say_so(target):
    dtype = torch.float32
    model, x = make_dit(dtype=dtype), _input(dtype).to(target)
    reference = _reference(0, target, dtype)
    handle = dispatch_pipeline(model, "layerwise", target, compression="lossless")
    assert torch.equal(model(x).cpu(), reference)
    report = handle.report()
    assert report.coded.coded == 0 and "5 stay raw" in str(report)
    assert all(unit.coded is None and unit.host.pinned == (target != "cpu") for unit in handle.runtime.rings[""].units)
    handle.remove()


@torch.inference_mode()
def test_refresh_codes_new_weights_anew(target):
    model, x = make_dit(), _input().to(target)
    handle = dispatch_pipeline(model, "layerwise", target, window=1, compression="lossless")
    model(x)
    model.load_state_dict(make_dit(seed=1).state_dict())  # copies into the host buffers the blocks view
    handle.refresh()
    assert torch.equal(model(x).cpu(), _reference(1, target))
    handle.remove()


def dit_with_first_parts_kept(target: str, compression):
    """The test DiT dispatched layer-wise to ``target``, the first part of every block kept on the device, run once."""
    model = make_dit()
    handle = dispatch_pipeline(model, "layerwise", target, window=2, compression=compression)
    ring = handle.runtime.rings[""]
    handle.runtime.set_residency("", {u.path: u.split_points()[0] for u in ring.units}, 2, stays=True)
    model(_input().to(target))
    assert ring.units[0].head is not None
    return model, handle


@pytest.mark.parametrize("compression", [None, "lossless"])
@torch.inference_mode()
def test_edits_to_parts_kept_on_the_device_survive_a_refresh_that_dispatches_again_and_remove(target, compression):
    def edit(model):  # in place, where the kept first part of block 0 sits
        model.blocks[0].up.weight.mul_(0.5)

    twin = make_dit()
    edit(twin)
    x = _input().to(target)
    reference = resident_run(twin, lambda: twin(x), target)
    model, handle = dit_with_first_parts_kept(target, compression)
    edit(model)
    model.blocks[2].gate = nn.Linear(DIM, DIM, dtype=torch.bfloat16)  # a new module (not run): dispatches again
    handle.refresh()
    assert torch.equal(model(x).cpu(), reference)
    handle.runtime.set_residency("", {u.path: u.split_points()[0] for u in handle.runtime.rings[""].units}, 2, stays=True)
    model(x)
    handle.remove()
    assert torch.equal(model.blocks[0].up.weight, twin.blocks[0].up.weight)


@pytest.mark.parametrize("compression", [None, "lossless"])
@torch.inference_mode()
def test_a_kept_tensor_given_new_data_keeps_it_through_remove(target, compression):
    # As peft's safe merge (fuse_lora(safe_fusing=True)) does: ``weight.data = merged``.
    model, handle = dit_with_first_parts_kept(target, compression)
    kept, streamed = model.blocks[0].up.weight, model.blocks[0].down.weight
    new_kept, new_streamed = kept.data.mul(0.5), streamed.data.mul(0.5)
    kept.data, streamed.data = new_kept, new_streamed
    handle.remove()
    assert torch.equal(model.blocks[0].up.weight, new_kept.cpu())
    assert torch.equal(model.blocks[0].down.weight, new_streamed.cpu())


@torch.inference_mode()
def test_remove_finishes_when_a_kept_tensor_changed_shape(target):
    from conftest import assert_restored, pipeline_state

    before = pipeline_state(make_dit())
    model, handle = dit_with_first_parts_kept(target, None)
    weight = model.blocks[0].up.weight
    weight.data = weight.data.view(weight.shape[1], weight.shape[0])
    handle.remove()  # the reshaped tensor cannot be kept; the rest is restored
    assert_restored(model, before)


@torch.inference_mode()
def test_a_whole_bf16_flux_pipeline_with_coded_blocks_is_bit_exact(target):
    pipe = make_flux_pipeline()
    pipe.to(torch.bfloat16)
    reference = resident_run(pipe, lambda: run_flux(pipe), target)
    handle = dispatch_pipeline(pipe, "layerwise", target, window=2, compression="lossless")
    assert torch.equal(run_flux(pipe).cpu(), reference)
    assert handle.report().coded.coded == handle.report().coded.blocks > 0
    handle.remove()


def fp8_round_trip(model: DiT) -> DiT:
    """``model`` with every block's linear weights replaced by what float8 storage gives back."""
    for module in model.blocks.modules():
        if isinstance(module, nn.Linear):
            q, scale = quantized(module.weight)
            upcast(q.view(torch.float8_e4m3fn).view(module.weight.shape), scale, module.weight.data)
    return model


def stored_model(handle) -> DiT:
    """A fresh model whose blocks' linear weights are what ``handle``'s float8 store holds, upcast on the CPU."""
    model = make_dit()
    weights = {}
    for unit in handle.runtime.rings[""].units:
        coded = unit.coded
        for index, ref in enumerate(unit.refs):
            if coded.quantize[index]:
                q = coded.store.view(coded.items[index]).view(torch.float8_e4m3fn).view(ref.local.shape)
                weights[ref.qualname] = torch.empty(ref.local.shape, dtype=ref.local.dtype)
                upcast(q, coded.store.view(coded.items[index] + 1), weights[ref.qualname])
    model.load_state_dict(weights, strict=False)
    return model


@pytest.mark.parametrize("window", [1, 2, 3])
@torch.inference_mode()
def test_fp8_blocks_give_the_output_of_their_float8_weights_exactly(window, target):
    model, x = make_dit(), _input().to(target)
    exact = _reference(0, target)
    handle = dispatch_pipeline(model, "layerwise", target, window=window, compression="fp8")
    # Streaming delivers exactly what the store holds (quantized where the dispatch ran: the device or the CPU).
    quantized_model = stored_model(handle)
    expected = resident_run(quantized_model, lambda: quantized_model(x), target)
    outputs = [model(x).cpu() for _ in range(3)]
    assert all(torch.equal(out, expected) for out in outputs)  # the same math as the round-tripped weights
    error = (outputs[0].float() - exact.float()).abs().max() / exact.float().abs().max()
    assert 0 < error < 0.03  # lossy, and by little
    coded = handle.report().coded
    assert coded.coded == 5 and 0.45 < coded.coded_bytes / coded.raw_bytes < 0.6
    ring = handle.runtime.rings[""]
    handle.runtime.set_residency("", {unit.path: unit.nbytes for unit in ring.units}, window)
    assert torch.equal(model(x).cpu(), exact)  # what a plan keeps on the device is copied as it is: exact
    handle.remove()
    assert torch.equal(model.to(target)(x).cpu(), exact)  # remove() gives back the bf16 weights


@torch.inference_mode()
def test_fp8_leaves_blocks_without_linear_weights_raw(target):
    model, x = make_dit(), _input().to(target)
    for block in model.blocks:
        block.up, block.down = nn.Identity(), nn.Identity()
    reference = resident_run(model, lambda: model(x), target)
    handle = dispatch_pipeline(model, "layerwise", target, compression="fp8")
    assert torch.equal(model(x).cpu(), reference) and handle.report().coded.coded == 0
    handle.remove()


@torch.inference_mode()
def test_compression_per_component(target, monkeypatch):
    monkeypatch.setattr("offload_map.mapping.compiler.STREAM_MIN_BYTES", 0)  # the tiny encoders stream too
    pipe = make_flux_pipeline()
    pipe.to(torch.bfloat16)
    reference = resident_run(pipe, lambda: run_flux(pipe), target)
    handle = dispatch_pipeline(pipe, "layerwise", target, compression={"transformer": "lossless", "text_encoder_2": "fp8"})
    kinds = {name: {type(u.coded).__name__ for u in ring.units} for name, ring in handle.runtime.rings.items()}
    assert kinds == {
        "transformer": {"CodedHost"},
        "text_encoder_2": {"Fp8Host"},
        "text_encoder": {"NoneType"},
        "vae": {"NoneType"},
    }
    assert "compression transformer lossless, text_encoder_2 fp8" in str(handle.device_map)
    assert not torch.equal(run_flux(pipe).cpu(), reference)  # T5 in float8
    handle.remove()
    handle = dispatch_pipeline(pipe, "layerwise", target, compression={"transformer": "lossless", "text_encoder": "lossless"})
    assert torch.equal(run_flux(pipe).cpu(), reference)
    loaded = DeviceMap.from_json(handle.device_map.to_json())
    assert loaded.compression == {"transformer": "lossless", "text_encoder": "lossless"}
    assert loaded.compression_of("text_encoder_2") is None
    handle.remove()


@pytest.mark.parametrize("window", [1, 2, 3])
@torch.inference_mode()
def test_compression_per_block_the_longest_path_wins(window, target):
    model, x = make_dit(), _input().to(target)
    reference = _reference(0, target)
    compression = {"": "lossless", "blocks.1": None, "blocks.3": "lossless"}
    handle = dispatch_pipeline(model, "layerwise", target, window=window, compression=compression)
    assert all(torch.equal(model(x).cpu(), reference) for _ in range(3))
    ring = handle.runtime.rings[""]
    assert [type(u.coded).__name__ for u in ring.units] == ["CodedHost", "NoneType", "CodedHost", "CodedHost", "CodedHost"]
    coded = handle.report().coded
    assert (coded.blocks, coded.coded, coded.others) == (4, 4, 1)  # the block left as it is is counted apart
    assert "4 of the 4 blocks compression applies to" in str(coded) and "1 other blocks" in str(coded)
    assert "compression (root) lossless, blocks.1 none, blocks.3 lossless" in str(handle.device_map)
    loaded = DeviceMap.from_json(handle.device_map.to_json())
    assert loaded.compression == compression and loaded.compression_of("blocks.1") is None
    handle.remove()
    handle = dispatch_pipeline(model, "layerwise", target, window=window, compression={"blocks": "fp8", "blocks.2": "lossless"})
    assert [type(u.coded).__name__ for u in handle.runtime.rings[""].units] == ["Fp8Host"] * 2 + ["CodedHost"] + ["Fp8Host"] * 2
    assert not torch.equal(model(x).cpu(), reference)  # fp8 blocks
    handle.remove()
    assert torch.equal(model.to(target)(x).cpu(), reference)


def test_a_budget_counts_staging_buffers_for_one_coded_block():
    model = make_dit()
    block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    resident = sum(p.numel() * p.element_size() for p in model.out.parameters())
    budget = resident + 3 * block + 200_000  # one slot and two staging buffers, counted raw; not two slots
    dmap = compile_device_map(model, "layerwise", "cpu", budget=budget, compression={"blocks.4": "lossless"})
    assert dmap.window == 1  # window 2 and the coded block's staging buffers would not fit


@torch.inference_mode()
def test_blocks_read_from_a_checkpoint_are_coded_too(tmp_path, target):
    from diffusers import FluxTransformer2DModel

    from offload_map import empty_model

    pipe = make_flux_pipeline()
    pipe.to(torch.bfloat16)
    reference = resident_run(pipe, lambda: run_flux(pipe), target)
    pipe.transformer.save_pretrained(tmp_path / "transformer")
    pipe.transformer = empty_model(FluxTransformer2DModel, tmp_path / "transformer", dtype=torch.bfloat16)
    handle = dispatch_pipeline(
        pipe, "layerwise", target, weights={"transformer": tmp_path / "transformer"}, compression="lossless"
    )
    coded = handle.report().coded
    assert coded.coded == coded.blocks > 0
    assert torch.equal(run_flux(pipe).cpu(), reference)
    handle.remove()


def test_the_map_carries_compression_through_json_and_print(tmp_path):
    dmap = compile_device_map(make_dit(), "layerwise")
    assert dmap.compression is None and "compression" not in dmap.to_dict()
    dmap.compression = "lossless"
    path = tmp_path / "map.json"
    dmap.save(path)
    assert json.loads(path.read_text())["compression"] == "lossless"
    loaded = DeviceMap.load(path)
    assert loaded.compression == "lossless" and "lossless compression" in str(loaded)
    handle = dispatch_pipeline(make_dit(), device_map=loaded, device="cpu")
    assert handle.report().coded.coded == 5
    handle.remove()


def test_bad_compression_values_and_combinations_are_refused_with_nothing_moved():
    model = make_dit()
    weight = model.blocks[0].up.weight
    with pytest.raises(ValueError, match=r"compression must be None, one of \['lossless', 'fp8'\] or .*, got 'zstd'"):
        dispatch_pipeline(model, "layerwise", "cpu", compression="zstd")
    with pytest.raises(ValueError, match="names 'transformer', which is no component, block or block list of the pipeline"):
        dispatch_pipeline(model, "layerwise", "cpu", compression={"transformer": "lossless"})
    with pytest.raises(
        ValueError, match="'blocks.1.up', .* inside block 'blocks.1', which is coded as one: name a component, a block"
    ):
        dispatch_pipeline(model, "layerwise", "cpu", compression={"blocks.1.up": "lossless"})
    with pytest.raises(ValueError, match="not a module path"):
        dispatch_pipeline(model, "layerwise", "cpu", compression={"blocks..1": "lossless"})
    with pytest.raises(ValueError, match=r"compression\['blocks'\] must be one of \['lossless', 'fp8'\] or None .*, got 'lossy'"):
        dispatch_pipeline(model, "layerwise", "cpu", compression={"blocks": "lossy"})
    with pytest.raises(ValueError, match="got 'lossy'"):
        dispatch_pipeline(model, "layerwise", "cpu", compression={"": "lossy"})
    with pytest.raises(ValueError, match="does not combine with shard_copies"):
        dispatch_pipeline(model, "layerwise", "cpu", compression="lossless", shard_copies=True)
    with pytest.raises(ValueError, match="compression must be"):
        DeviceMap.from_dict({**compile_device_map(model, "layerwise").to_dict(), "compression": "fp4"})
    assert model.blocks[0].up.weight is weight and not hasattr(model, "_hf_hook")
    dispatch_pipeline(model, "layerwise", "cpu", compression="lossless").remove()  # and it still dispatches


def test_pieces_of_a_large_unit_decode_through_a_small_staging_buffer():
    raw = torch.randn(PIECE // 2 + 1024, generator=torch.Generator().manual_seed(3)).mul(0.02).bfloat16()
    raw = raw.view(torch.uint8)
    raw[1000:1200] = 0xFF  # escapes in the first piece
    host = CodedHost.of(raw)
    ordering = SyncOrdering(torch.device("cpu"))
    staging = Staging(host.staging_bytes(), ordering)
    assert host.staging_bytes() < PIECE  # one piece's code, not the unit's
    out = torch.zeros_like(raw)
    host.copy(out, 0, raw.numel(), staging)
    assert torch.equal(out, raw)
    assert host.part_bytes(0, raw.numel()) == host.nbytes
    for start, stop in [(512 * 7, raw.numel()), (0, PIECE + 512), (PIECE - 512, PIECE + 1024)]:  # parts of pieces
        part = torch.zeros(stop - start, dtype=torch.uint8)
        host.copy(part, start, stop, staging)
        assert torch.equal(part, raw[start:stop])
        assert host.part_bytes(start, stop) < (stop - start) * 0.8 + 2 * 3072  # + each piece's table and alignment


# -- on the GPU -------------------------------------------------------------------------------------------


def _kernel_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    every_pattern = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8)
    return [
        torch.randn(1 << 20, generator=g).mul(0.02).bfloat16().view(torch.uint8),
        torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=g),  # all escapes
        every_pattern,
        torch.zeros(4096, dtype=torch.uint8),
        torch.randn(1 << 18, generator=g).half().view(torch.uint8),
    ]


@pytest.mark.cuda
@pytest.mark.parametrize("case", range(5))
def test_the_kernel_decodes_what_the_torch_decoder_does(case):
    assert codec_kernel.expand is not None, "Triton is missing on this CUDA machine"
    raw = _kernel_cases()[case]
    coded = codec.encode(raw)
    for start, stop in [(0, raw.numel()), (512, raw.numel()), (1024, raw.numel() - 2048)]:
        part = coded.part(start, stop)
        staging = torch.empty(codec.footprint(part) + 4096, dtype=torch.uint8, device="cuda")
        planes = part.like(staging[512:])  # not at the buffer's start
        for dst, src in zip(planes.planes, part.planes):
            dst.copy_(src)
        out = torch.full((stop - start + 512,), 0xAB, dtype=torch.uint8, device="cuda")
        codec.decode(planes, out[:-512])
        assert torch.equal(out[:-512].cpu(), raw[start:stop])
        assert torch.equal(out[-512:].cpu(), torch.full((512,), 0xAB, dtype=torch.uint8))  # nothing written past


@pytest.mark.cuda
@pytest.mark.parametrize("window", [1, 2, 3])
@torch.inference_mode()
def test_slow_copies_and_slow_decodes_give_the_resident_output(window, monkeypatch):
    # The block waits for the decode (``ready`` after it), the next piece's copy into the staging buffer waits
    # for the decode that reads it, and a slot is decoded into only after its last reader.
    from test_stream_order import _cycles_for, delayed_copies

    expand = codec.expand

    def slow_expand(*args):
        torch.cuda._sleep(_cycles_for(0.002))
        expand(*args)

    monkeypatch.setattr(codec, "expand", slow_expand)
    monkeypatch.setattr("offload_map.runtime.coded_host.PIECE", 64 * 1024)  # several pieces per block
    model, x = make_dit(), _input().cuda()
    reference = _reference(0, "cuda")
    handle = dispatch_pipeline(model, "layerwise", "cuda", window=window, compression="lossless")
    ring = handle.runtime.rings[""]
    handle.runtime.set_residency("", {ring.units[0].path: ring.units[0].split_points()[0]}, window)
    with delayed_copies(0.002):
        outputs = [model(x) for _ in range(3)]
    assert all(torch.equal(out.cpu(), reference) for out in outputs)
    handle.remove()


def test_quantizing_on_the_cpu_gives_the_round_trip_weights():
    model = make_dit()
    handle = dispatch_pipeline(model, "layerwise", "cpu", compression="fp8")
    stored, round_trip = stored_model(handle).state_dict(), fp8_round_trip(make_dit()).state_dict()
    assert all(torch.equal(stored[name], round_trip[name]) for name in round_trip)
    handle.remove()


@pytest.mark.cuda
def test_quantizing_on_the_device_matches_the_cpu():
    weight = torch.randn(256, 1024, generator=torch.Generator().manual_seed(4)).mul(0.02).bfloat16()
    on_cpu, on_device = quantized(weight), quantized(weight.cuda())
    assert torch.equal(on_cpu[1], on_device[1].cpu()), "scales differ"
    differs = (on_cpu[0] != on_device[0].cpu()).sum().item()
    assert differs == 0, f"{differs} of {weight.numel()} float8 values differ"


def test_fp8_tables_refuse_tensors_off_the_kernels_alignment():
    """The chunk kernel is promised offsets on 16-byte boundaries (its accesses go 16 bytes at a time): a layout
    that broke that (the host buffer's gives 512) is refused with a message, never handed to the kernel."""
    from dataclasses import replace

    from offload_map.runtime.fp8_host import Fp8Host
    from offload_map.runtime.host_buffer import layout

    regions, nbytes = layout([torch.empty(4, 32, dtype=torch.bfloat16), torch.empty(8, dtype=torch.bfloat16)])
    regions[1] = replace(regions[1], offset=regions[0].span + 8)  # 8 bytes past the weight: off the grid
    host = Fp8Host(regions, torch.zeros(nbytes, dtype=torch.uint8), [True, False], None, False)
    with pytest.raises(RuntimeError, match=r"tensors 0-2 are not all on 16-byte boundaries .*please report this"):
        host.tables(0, 2, 0)


@pytest.mark.cuda
@pytest.mark.parametrize("columns, bias, half, aligned", [(2500, 300, 33, False), (2560, 304, 48, True)])
def test_the_fp8_kernel_expands_a_chunk_as_torch_does(monkeypatch, columns, bias, half, aligned):
    """Widths all multiples of 16 (``aligned``, the kernel's 16-byte accesses) or not (one byte at a time)."""
    from offload_map.runtime import fp8_kernel
    from offload_map.runtime.fp8_host import Fp8Host
    from offload_map.runtime.host_buffer import layout

    g = torch.Generator().manual_seed(2)
    weight = torch.randn(300, columns, generator=g).mul(0.02).bfloat16()  # rows of three column blocks
    weight[7] = 0  # a zero row: scale 1
    weight[9, 3] = 3e4  # one large value in a row
    tensors = [weight, torch.randn(bias, generator=g).bfloat16(), torch.randn(70, half, generator=g).half()]
    tensors.append(torch.randn(5000, generator=g))  # float32, copied as it is
    regions, nbytes = layout(tensors)
    raw = torch.zeros(nbytes, dtype=torch.uint8)
    for region, t in zip(regions, tensors):
        region.raw(raw).copy_(t.flatten())
    host = Fp8Host(regions, raw, [True, False, True, False], None, False)
    monkeypatch.setattr(fp8_kernel, "PROGRAMS", 7)  # programs that loop over tiles, as big weights' do
    expected = torch.full((nbytes + 512,), 0xAB, dtype=torch.uint8)
    for index in range(len(tensors)):
        host._expand(index, host.store.flat, 0, expected, 0)  # on the CPU: torch
    out, staged = torch.full_like(expected, 0xAB, device="cuda"), host.store.flat.cuda()
    assert fp8_kernel.converts_float8(0), "this GPU lacks float8 conversions"
    launches = host.tables(0, len(tensors), 0)
    assert [(dtype, flag) for dtype, _, _, flag in launches] == [(torch.bfloat16, aligned), (torch.float16, aligned)]
    for dtype, table, programs, flag in launches:
        fp8_kernel.expand(staged, out, dtype, torch.tensor(table, dtype=torch.int64, device="cuda"), programs, flag)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.cuda
@torch.inference_mode()
def test_fp8_loads_expand_each_chunk_in_one_launch(monkeypatch):
    """Issued tensor by tensor, a block of SD3.5-medium cost the host 26 to 42 launches and copies, and its fp8
    step on an H200 took 0.132 s against 0.081 s raw: a chunk now costs one launch (per dtype of its weights)."""
    from offload_map.runtime import fp8_host, fp8_kernel

    launches, chunks = [], []
    expand, copy = fp8_kernel.expand, fp8_host.Fp8Host.copy

    def counted(host, target, start, stop, staging):  # the chunks each load copies
        chunks.extend(host._chunks(start, stop))
        copy(host, target, start, stop, staging)

    monkeypatch.setattr(fp8_kernel, "expand", lambda *args: launches.append(args[2]) or expand(*args))
    monkeypatch.setattr(fp8_host.Fp8Host, "copy", counted)
    monkeypatch.setattr(fp8_host.Fp8Host, "_expand", lambda *args: pytest.fail("a tensor expanded on its own"))
    monkeypatch.setattr(fp8_host, "CHUNK", 160 * 1024)  # two chunks a block, each a weight with other tensors
    model, x = make_dit(), _input().cuda()
    handle = dispatch_pipeline(model, "layerwise", "cuda", window=2, compression="fp8")
    quantized_model = stored_model(handle)
    launches.clear()
    chunks.clear()
    out = model(x)
    # one launch a chunk (these blocks' weights are all bf16), the tensors stored as they are in it too
    assert len(launches) == len(chunks) > len(model.blocks)
    assert all(b - a > 1 for a, b in chunks)
    assert torch.equal(out.cpu(), resident_run(quantized_model, lambda: quantized_model(x), "cuda"))
    handle.remove()


@pytest.mark.cuda
@torch.inference_mode()
def test_fp8_blocks_with_slow_copies_give_the_output_of_their_float8_weights(monkeypatch):
    from test_stream_order import delayed_copies

    monkeypatch.setattr("offload_map.runtime.fp8_host.CHUNK", 64 * 1024)  # several chunks per block
    model, x = make_dit(), _input().cuda()
    handle = dispatch_pipeline(model, "layerwise", "cuda", window=2, compression="fp8")
    quantized_model = stored_model(handle)
    expected = resident_run(quantized_model, lambda: quantized_model(x), "cuda")
    with delayed_copies(0.002):
        outputs = [model(x) for _ in range(3)]
    assert all(torch.equal(out.cpu(), expected) for out in outputs)
    handle.remove()


@pytest.mark.cuda
@pytest.mark.parametrize("compression", ["lossless", "fp8"])
@torch.inference_mode()
def test_coded_streaming_never_synchronises_the_host(compression):
    model, x = make_dit(), _input().cuda()
    handle = dispatch_pipeline(model, "layerwise", "cuda", window=2, compression=compression)
    model(x)
    model(x)
    assert_no_host_sync(lambda: model(x))
    handle.remove()


# -- found in review: each fails on the code before its fix -------------------------------------------------


class MixedBlock(nn.Module):
    """A linear weight packed first (it halves in float8), then two raw tensors: a kept part's tail is all raw."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.a = nn.Linear(160 * scale, 128, bias=False)
        self.b = nn.Embedding(60 * scale, 256)
        self.c = nn.Embedding(64 * scale, 256)

    def forward(self, x):
        return x + self.a.weight[:1, :4].float() + self.b.weight[:1, :4].float() + self.c.weight[:1, :4].float()


class MixedDiT(DiT):
    def __init__(self, scale: int = 1) -> None:
        nn.Module.__init__(self)
        self.blocks = nn.ModuleList(MixedBlock(scale) for _ in range(2))
        self.out = nn.Identity()


@torch.inference_mode()
def test_an_fp8_tail_from_a_kept_part_fits_the_staging_buffers(monkeypatch):
    monkeypatch.setattr("offload_map.runtime.fp8_host.CHUNK", 64 * 1024)
    torch.manual_seed(0)
    model, x = MixedDiT().bfloat16().eval(), torch.zeros(1, 4)
    handle = dispatch_pipeline(model, "layerwise", "cpu", window=1, compression="fp8")
    units = handle.runtime.rings[""].units
    handle.runtime.set_residency("", {unit.path: unit.split_points()[0] for unit in units}, 1)
    out = model(x)  # raised: the tail's chunk was larger than any chunk counted from the block's start
    handle.remove()
    assert torch.equal(out, model(x))  # the tails are raw, the kept linears exact: the resident output


@torch.inference_mode()
def test_refresh_to_weights_whose_code_is_larger_reallocates_the_staging_buffers():
    model, x = make_dit(), _input()
    handle = dispatch_pipeline(model, "layerwise", "cpu", window=1, compression="lossless")
    model(x)
    new, g = make_dit(seed=1), torch.Generator().manual_seed(1)
    for p in new.blocks.parameters():  # exponents spread wide: many escapes, a larger code
        p.copy_((torch.randn(p.shape, generator=g) * torch.exp2(torch.randint(-30, 10, p.shape, generator=g).float())).bfloat16())
    model.load_state_dict(new.state_dict())
    handle.refresh()
    assert torch.equal(model(x), new(x))
    handle.remove()


@torch.inference_mode()
def test_refresh_with_fp8_kept_parts_keeps_the_exact_weights():
    model, x = make_dit(), _input()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    handle = dispatch_pipeline(model, "layerwise", "cpu", window=2, compression="fp8")
    ring = handle.runtime.rings[""]
    handle.runtime.set_residency("", {u.path: u.split_points()[0] for u in ring.units}, 2)
    model(x)
    handle.refresh()  # nothing changed: the kept parts on the device must not write float8 values back
    handle.remove()
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])] == []


class IdleDiT(DiT):
    """Blocks that compute nothing: copies dominate, so a plan keeps every block it can."""

    def forward(self, x):
        for block in self.blocks:
            x = x + block.up.weight[:1, : x.shape[-1]].float() * 0
        return x


@pytest.mark.parametrize("compression", [{"": "lossless"}, "fp8"])
def test_a_planned_map_dispatches_again_and_gives_the_same_output(compression):
    torch.manual_seed(0)
    model, x = IdleDiT().bfloat16().eval().requires_grad_(False), torch.zeros(1, DIM)
    handle = dispatch_pipeline(model, "layerwise", "cpu", gpu_budget=64 * 2**20, compression=compression)
    with torch.inference_mode():
        for _ in range(4):
            first = model(x)
    saved = handle.device_map.to_json()
    handle.remove()
    handle = dispatch_pipeline(model, device_map=DeviceMap.from_json(saved))  # refused: its component kept whole
    with torch.inference_mode():
        assert torch.equal(model(x), first)  # fp8 kept blocks were float8 on the device, exact once re-dispatched
    handle.remove()
    dispatch_pipeline(make_dit(), "auto", "cpu", gpu_budget=10 * 2**30, compression={"": "lossless"}).remove()


def test_the_dispatch_time_window_leaves_room_for_the_staging_buffers():
    model = make_dit()
    block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    resident = sum(p.numel() * p.element_size() for p in model.out.parameters())
    budget = resident + 3 * block + 200_000  # one slot and two staging buffers, counted raw; not two slots
    handle = dispatch_pipeline(model, "layerwise", "cpu", gpu_budget=budget, compression="lossless")
    assert handle.device_map.window == 1  # window 2 and its staging buffers would not fit
    assert resident + handle.runtime.slot_bytes <= budget
    handle.remove()


@torch.inference_mode()
def test_a_failed_recode_leaves_the_old_code_in_use(monkeypatch):
    model, x = make_dit(), _input()
    handle = dispatch_pipeline(model, "layerwise", "cpu", window=1, compression="lossless")
    expected = model(x)

    def interrupted(raw):
        raise KeyboardInterrupt

    monkeypatch.setattr("offload_map.runtime.coded_host.encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        handle.refresh()
    monkeypatch.undo()
    assert torch.equal(model(x), expected)
    handle.remove()


@torch.inference_mode()
def test_per_component_totals_count_only_compressed_components(monkeypatch):
    monkeypatch.setattr("offload_map.mapping.compiler.STREAM_MIN_BYTES", 0)
    pipe = make_flux_pipeline()
    pipe.to(torch.bfloat16)
    handle = dispatch_pipeline(pipe, "layerwise", "cpu", compression={"transformer": "lossless"})
    coded = handle.report().coded
    assert coded.blocks == coded.coded == len(handle.runtime.rings["transformer"].units)
    assert handle.runtime.rings["text_encoder_2"].wire_ratio == 1.0
    assert handle.runtime.rings["transformer"].wire_ratio < 0.85
    handle.remove()


class SkippingDiT(DiT):
    """Blocks 0-1 bf16 (coded), 2-4 float32 (streamed raw); forwards start at block ``skip``."""

    def __init__(self) -> None:
        super().__init__()
        self.bfloat16()
        for block in self.blocks[2:]:
            block.float()
            for p in block.parameters():  # float32 values of full precision: bf16 ones in float32 would compress
                p.data.normal_(0, 0.02)
        self.skip = 0

    def forward(self, x):
        for block in self.blocks[self.skip :]:
            x = block(x.to(block.up.weight.dtype))
        return self.out(x.to(self.out.weight.dtype))


@pytest.mark.cuda
@torch.inference_mode()
def test_a_raw_load_after_a_cancelled_coded_load_waits_for_its_decodes(monkeypatch):
    # A forward that skips blocks 0-1 cancels their prefetched (coded) loads; their decodes, slowed on the decode
    # stream, may still be writing the slots that the raw blocks are loaded into next.
    from test_stream_order import _cycles_for

    expand = codec.expand

    def slow_expand(*args):
        torch.cuda._sleep(_cycles_for(0.01))
        expand(*args)

    monkeypatch.setattr(codec, "expand", slow_expand)
    torch.manual_seed(0)
    model, x = SkippingDiT().eval().requires_grad_(False), _input().cuda()
    handle = dispatch_pipeline(model, "layerwise", "cuda", window=2, compression="lossless")
    assert [unit.coded is not None for unit in handle.runtime.rings[""].units] == [True, True, False, False, False]
    model(x)
    model(x)  # ends by prefetching blocks 0-1 for the next forward
    model.skip = 2
    skipped = [model(x).cpu() for _ in range(2)]
    handle.remove()
    reference = model.cuda()(x).cpu()
    assert all(torch.equal(out, reference) for out in skipped)
