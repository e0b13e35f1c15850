"""Blocks coded losslessly and read from a checkpoint hold only their code in host memory: at rest their tensors
view the file, copy-on-write. Outputs stay bit-exact; edits and refresh work as with a raw host copy, and never
write the file."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings

import pytest
import torch
from diffusers import FluxTransformer2DModel

from offload_map import compile_device_map, dispatch_pipeline, empty_model
from offload_map.runtime import file_views, host_store
from offload_map.runtime.coded_host import CodedHost
from offload_map.runtime.file_views import FileViews
from offload_map.runtime.host_buffer import HostBuffer
from offload_map.runtime.mapped_host import MappedHost

from conftest import resident_run
from tiny_pipelines import make_flux_pipeline, run_flux


def saved_pipeline(tmp_path, dtype=torch.bfloat16):
    """A bf16 tiny Flux pipeline whose transformer is on the meta device, its checkpoint (saved in ``dtype``), and
    the resident output."""
    pipe = make_flux_pipeline()
    pipe.to(torch.bfloat16)
    pipe.transformer.to(dtype).save_pretrained(tmp_path / "transformer")
    pipe.transformer.to(torch.bfloat16)
    return pipe, tmp_path / "transformer"


def dispatch(pipe, path, target, **options):
    pipe.transformer = empty_model(FluxTransformer2DModel, path, dtype=torch.bfloat16)
    return dispatch_pipeline(pipe, "layerwise", target, weights={"transformer": path}, compression="lossless", **options)


def streamed(handle) -> list:
    return [unit for ring in handle.runtime.rings.values() for unit in ring.units]


def digest(path) -> str:
    return hashlib.sha256((path / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()


def refresh_interrupted(handle, at: int, monkeypatch) -> None:
    """``handle.refresh()``, interrupted (Ctrl-C) when it starts coding its ``at``-th block."""
    encode, calls = CodedHost.encode, []

    def interrupted(self, raw):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        encode(self, raw)

    monkeypatch.setattr(CodedHost, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        handle.refresh()
    monkeypatch.setattr(CodedHost, "encode", encode)


def edit_and_refresh(pipe, handle, target):
    """Halve the single blocks' weights of ``pipe``'s transformer in place (``load_state_dict``: into the views of
    the files, private pages), ``refresh()``, check the output against the resident run of a pipeline so edited,
    and return that pipeline."""
    edited = make_flux_pipeline()
    edited.to(torch.bfloat16)
    for p in edited.transformer.single_transformer_blocks.parameters():
        p.mul_(0.5)
    pipe.transformer.load_state_dict(edited.transformer.state_dict())
    handle.refresh()
    assert torch.equal(run_flux(pipe).cpu(), resident_run(edited, lambda: run_flux(edited), target))
    return edited


def at_rest_in_file(unit) -> bool:
    return all(unit.host.holds(i, ref.local) for i, ref in enumerate(unit.refs))


@pytest.mark.parametrize("window", [1, 2, 3])
@torch.inference_mode()
def test_blocks_read_from_a_checkpoint_hold_only_their_code_and_stay_bit_exact(tmp_path, target, window):
    pipe, path = saved_pipeline(tmp_path)
    weights = {name: p.clone() for name, p in pipe.transformer.named_parameters()}
    reference = resident_run(pipe, lambda: run_flux(pipe), target)
    handle = dispatch(pipe, path, target, window=window)
    units = streamed(handle)
    assert units and all(isinstance(u.host, MappedHost) and u.coded is not None for u in units)
    for _ in range(2):
        assert torch.equal(run_flux(pipe).cpu(), reference)
        assert all(at_rest_in_file(u) for u in units)  # between forwards, the file again
    report = handle.report()
    assert f"{len(units)} held only coded" in str(report)
    raw, coded = report.host_bytes
    block_bytes = sum(u.nbytes for u in units)
    held = raw + coded - sum(u.host.nbytes for u in handle.runtime.host.units.values() if isinstance(u.host, HostBuffer))
    assert held == sum(u.coded.nbytes for u in units) < 0.8 * block_bytes  # the blocks: their code, nothing raw
    handle.remove()
    for name, p in pipe.transformer.named_parameters():  # back on the CPU, owning the checkpoint's bytes
        assert p.device.type == "cpu" and torch.equal(p, weights[name]), name


@torch.inference_mode()
def test_edits_land_in_private_pages_and_refresh_codes_them(tmp_path, target):
    pipe, path = saved_pipeline(tmp_path)
    before = digest(path)
    handle = dispatch(pipe, path, target)
    run_flux(pipe)
    edited = edit_and_refresh(pipe, handle, target)
    assert all(isinstance(u.host, MappedHost) and at_rest_in_file(u) for u in streamed(handle))
    handle.remove()
    assert digest(path) == before  # the file never changed
    for (name, mine), theirs in zip(pipe.transformer.named_parameters(), edited.transformer.parameters()):
        assert torch.equal(mine, theirs), name  # remove() gives back the edited weights


@torch.inference_mode()
def test_a_block_whose_new_weights_do_not_compress_gets_a_raw_buffer_again(tmp_path, target):
    pipe, path = saved_pipeline(tmp_path)
    handle = dispatch(pipe, path, target, window=1)
    run_flux(pipe)
    block = pipe.transformer.single_transformer_blocks[0]
    g = torch.Generator().manual_seed(1)
    for p in block.parameters():  # exponents spread wide: the code would be larger than the bytes
        p.copy_((torch.randn(p.shape, generator=g) * torch.exp2(torch.randint(-30, 10, p.shape, generator=g).float())).bfloat16())
    edited = {name: p.clone() for name, p in pipe.transformer.named_parameters()}
    handle.refresh()
    unit = handle.runtime.host.units["transformer.single_transformer_blocks.0"]
    assert isinstance(unit.host, HostBuffer) and unit.coded is None
    assert all(unit.host.holds(i, ref.local) for i, ref in enumerate(unit.refs))
    out = run_flux(pipe).cpu()
    handle.remove()
    twin = make_flux_pipeline()
    twin.to(torch.bfloat16)
    twin.transformer.load_state_dict(edited)
    assert torch.equal(out, resident_run(twin, lambda: run_flux(twin), target))


@torch.inference_mode()
def test_an_interrupted_refresh_streams_the_rest_raw_with_the_new_weights(tmp_path, target, monkeypatch):
    pipe, path = saved_pipeline(tmp_path)
    handle = dispatch(pipe, path, target)
    run_flux(pipe)
    edited = make_flux_pipeline()
    edited.to(torch.bfloat16)
    for p in edited.transformer.parameters():
        p.mul_(0.5)
    pipe.transformer.load_state_dict(edited.transformer.state_dict())
    refresh_interrupted(handle, 3, monkeypatch)
    units = streamed(handle)
    assert [isinstance(u.host, MappedHost) for u in units] == [True, True] + [False] * (len(units) - 2)
    assert all(u.coded is None for u in units[2:])
    reference = resident_run(edited, lambda: run_flux(edited), target)
    assert torch.equal(run_flux(pipe).cpu(), reference)
    handle.remove()


@torch.inference_mode()
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_a_checkpoint_stored_in_another_dtype_keeps_the_raw_buffer_and_says_so(tmp_path, target, stored, caplog):
    # Read from a float32 checkpoint into bf16, the blocks are built in memory: host memory holds both, about 1.71x
    # their bytes, and dispatch says why (a user saw the RSS grow and nothing else).
    pipe, path = saved_pipeline(tmp_path, dtype=stored)
    reference = resident_run(pipe, lambda: run_flux(pipe), target)
    with caplog.at_level(logging.WARNING, logger="offload_map"):
        handle = dispatch(pipe, path, target)
    units = streamed(handle)
    converted = stored is torch.float32
    assert (f"{len(units)} coded blocks" in caplog.text and "built in memory" in caplog.text) is converted
    assert all(isinstance(u.host, HostBuffer) is converted and u.coded is not None for u in units)
    assert ("held only coded" in str(handle.report())) is not converted
    assert torch.equal(run_flux(pipe).cpu(), reference)
    handle.remove()


@torch.inference_mode()
def test_a_budget_plans_with_blocks_held_only_coded_and_stays_exact(tmp_path, target):
    from safetensors.torch import save_file
    from test_compression import _input, _reference, make_dit

    model, x = make_dit(), _input().to(target)
    save_file(model.state_dict(), tmp_path / "dit.safetensors")
    with torch.device("meta"):
        empty = make_dit()
    block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    handle = dispatch_pipeline(
        empty, "auto", target, gpu_budget=7 * block // 2, weights=tmp_path / "dit.safetensors", compression="lossless"
    )
    reference = _reference(0, target)
    assert all(torch.equal(empty(x).cpu(), reference) for _ in range(4))
    assert handle.plans[""]  # planned from measurements (what it keeps depends on them: see the next test)
    assert all(isinstance(u.host, MappedHost) for u in handle.runtime.host.units.values() if u.coded is not None)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(empty.state_dict().values(), model.state_dict().values()))


@torch.inference_mode()
def test_parts_kept_on_the_device_are_decoded_from_the_code(tmp_path):
    from test_compression import _input, _reference

    model, handle, _ = dit_from_checkpoint(tmp_path)
    keep_first_parts(handle)
    for _ in range(3):
        assert torch.equal(model(_input()), _reference(0, "cpu"))
    units = list(handle.runtime.host.units.values())
    assert all(u.head is not None and isinstance(u.host, MappedHost) for u in units)
    handle.remove()


def dit_from_checkpoint(tmp_path, **options):
    """The test_compression DiT saved to a safetensors file and dispatched from it, lossless, on the CPU."""
    from safetensors.torch import save_file
    from test_compression import make_dit

    file = tmp_path / "dit.safetensors"
    save_file(make_dit().state_dict(), file)
    with torch.device("meta"):
        model = make_dit()
    handle = dispatch_pipeline(model, "layerwise", "cpu", weights=file, compression="lossless", progress=False, **options)
    return model, handle, file


def smaps_kib(file, keys: tuple[str, ...]) -> int:
    """The KiB that ``/proc/self/smaps`` gives under ``keys`` for this process's mappings of ``file``."""
    total, mapping = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split(maxsplit=5)
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                mapping = len(fields) == 6 and fields[5].rstrip("\n") == str(file)
            elif mapping and fields[0] in keys:
                total += int(fields[1])
    return total


def private_kib(file) -> int:
    """KiB of private (written) pages in this process's mappings of ``file``, in memory or swapped out."""
    return smaps_kib(file, ("Anonymous:", "Swap:"))


def resident_kib(file) -> int:
    """KiB of ``file``'s mapped pages in this process's memory (read or written)."""
    return smaps_kib(file, ("Rss:",))


def keep_whole_blocks(handle) -> None:
    ring = handle.runtime.rings[""]
    handle.runtime.set_residency("", {u.path: u.nbytes for u in ring.units[:3]}, 1, stays=True)


def keep_first_parts(handle) -> None:
    ring = handle.runtime.rings[""]
    handle.runtime.set_residency("", {u.path: u.split_points()[0] for u in ring.units}, 2, stays=True)


@torch.inference_mode()
def test_a_refresh_that_changed_nothing_writes_no_page_of_the_file_mapping(tmp_path):
    from test_compression import _input

    model, handle, file = dit_from_checkpoint(tmp_path)
    keep_whole_blocks(handle)  # their tensors sit on the device: refresh copies them back
    model(_input())
    handle.refresh()
    assert private_kib(file) == 0  # a written page would stay in memory for good
    model.blocks[4].up.weight.mul_(0.5)  # an edit does write one (the measure sees it)
    handle.refresh()
    assert private_kib(file) > 0
    handle.remove()


@torch.inference_mode()
def test_edited_pages_go_with_remove(tmp_path):
    from test_compression import _input

    model, handle, file = dit_from_checkpoint(tmp_path)
    model(_input())
    for p in model.blocks.parameters():
        p.mul_(0.5)
    edited = {name: p.clone() for name, p in model.blocks.named_parameters()}
    handle.refresh()
    assert private_kib(file) > 0
    handle.remove()  # the handle lives on, the views are gone: so is the mapping, with its written pages
    assert private_kib(file) == 0
    files = FileViews()  # read by weights=, they get memory of their own: the file may be written over now
    for name, p in model.blocks.named_parameters():
        assert not files.viewed(p) and torch.equal(p, edited[name]), name


@torch.inference_mode()
def test_after_a_refresh_that_dispatches_again_weights_read_by_weights_view_no_checkpoint(tmp_path):
    # Restoring for the new dispatch gives them memory of their own, as remove() does: given back as views, the
    # new dispatch would count them as the user's, a later remove() would leave them tied to the checkpoint, and
    # writing over it would change the model's weights or, truncated, kill the process.
    from test_compression import DIM, _input, _reference

    model, handle, file = dit_from_checkpoint(tmp_path)
    model(_input())
    model.blocks[2].gate = torch.nn.Linear(DIM, DIM, dtype=torch.bfloat16)  # not run: the outputs stay
    handle.refresh()  # modules changed: it dispatches again
    assert torch.equal(model(_input()), _reference(0, "cpu"))
    handle.remove()
    files = FileViews()
    assert not any(files.viewed(p) for p in model.parameters())
    file.write_bytes(b"\0" * file.stat().st_size)  # written over in place: the model keeps its weights
    assert torch.equal(model(_input()), _reference(0, "cpu"))


@torch.inference_mode()
def test_an_interrupted_refresh_leaves_kept_blocks_on_the_device(tmp_path, monkeypatch):
    from test_compression import _input, _reference

    model, handle, _ = dit_from_checkpoint(tmp_path)
    keep_first_parts(handle)
    model(_input())
    refresh_interrupted(handle, 2, monkeypatch)  # after one block: its staging buffers, so the heads, stay as they are
    kept = [u for u in handle.runtime.host.units.values() if u.head is not None]
    assert len(kept) > 2 and all(isinstance(u.host, HostBuffer) for u in kept[1:])  # they stream raw from now on
    for unit in kept:
        head = range(unit.head.data_ptr(), unit.head.data_ptr() + unit.kept)
        assert all(ref.local.data_ptr() in head for ref in unit.refs[: unit.split]), unit.path
    assert torch.equal(model(_input()), _reference(0, "cpu"))
    handle.remove()


@torch.inference_mode()
def test_a_file_that_cannot_be_mapped_leaves_a_raw_copy_with_a_warning(tmp_path, monkeypatch, caplog):
    import sys

    from test_compression import _input, _reference

    from_file = torch.UntypedStorage.from_file

    def refused(*args, **kwargs):  # as torch reports mmap failing (strict overcommit); safetensors' reads go on
        if sys._getframe(1).f_code.co_name != "map_private":
            return from_file(*args, **kwargs)
        raise RuntimeError("unable to mmap 2048 bytes from file: Cannot allocate memory (12)")

    monkeypatch.setattr(torch.UntypedStorage, "from_file", refused)
    model, handle, file = dit_from_checkpoint(tmp_path)
    assert f"cannot map {file}" in caplog.text
    units = list(handle.runtime.host.units.values())
    assert all(isinstance(u.host, HostBuffer) for u in units) and all(u.coded is not None for u in units)
    assert torch.equal(model(_input()), _reference(0, "cpu"))
    handle.remove()


@torch.inference_mode()
def test_two_experts_and_an_encoder_read_from_checkpoints_hold_only_their_code(tmp_path, target):
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from tiny_pipelines import make_wan22_pipeline, run_wan22

    pipe = make_wan22_pipeline()
    pipe.to(torch.bfloat16)
    reference = resident_run(pipe, lambda: run_wan22(pipe), target)
    classes = {"transformer": WanTransformer3DModel, "transformer_2": WanTransformer3DModel, "text_encoder": UMT5EncoderModel}
    for name, cls in classes.items():
        getattr(pipe, name).save_pretrained(tmp_path / name)
        setattr(pipe, name, empty_model(cls, tmp_path / name, dtype=torch.bfloat16))
    dmap = compile_device_map(pipe, "layerwise", target)
    for index in range(2):  # the tiny UMT5 is below the size that streams on its own
        dmap[f"text_encoder.encoder.block.{index}"] = "layer-window"
    handle = dispatch_pipeline(
        pipe, device_map=dmap, weights={n: tmp_path / n for n in classes}, compression="lossless", progress=False
    )
    units = streamed(handle)
    assert {u.path.split(".")[0] for u in units} == set(classes)
    assert all(isinstance(u.host, MappedHost) for u in units)
    for _ in range(2):
        assert torch.equal(run_wan22(pipe).cpu(), reference)
    handle.remove()


class Gated(torch.nn.Module):
    """A block with a 0-dim parameter (a scalar gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.gate = torch.nn.Linear(256, 256), torch.nn.Parameter(torch.tensor(0.5))
        torch.nn.init.normal_(self.linear.weight, std=0.02)

    def forward(self, x):
        return x + self.gate * self.linear(x)


class GatedDiT(torch.nn.Module):
    _layerwise_offload_blocks_attrs = ["blocks"]

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(Gated() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@torch.inference_mode()
def test_a_refresh_compares_kept_0_dim_tensors_too(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model, x = GatedDiT().bfloat16(), torch.randn(2, 256).bfloat16()
    save_file(model.state_dict(), tmp_path / "dit.safetensors")
    with torch.device("meta"):
        empty = GatedDiT().bfloat16()
    handle = dispatch_pipeline(empty, "layerwise", "cpu", weights=tmp_path / "dit.safetensors", compression="lossless")
    keep_whole_blocks(handle)  # the gates sit on the device: refresh compares them with the file's
    assert torch.equal(empty(x), model(x))
    handle.refresh()
    assert all(isinstance(u.host, MappedHost) and u.coded is not None for u in streamed(handle))
    assert torch.equal(empty(x), model(x))
    handle.remove()


def test_read_pages_leave_and_written_pages_stay(tmp_path):
    import mmap

    from offload_map.runtime.file_views import FileViews, release_read_pages

    file = tmp_path / "weights.bin"
    file.write_bytes(os.urandom(64 * mmap.PAGESIZE))
    with open(file, "rb") as f:
        view = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
    expected = view.clone()
    view[10 * mmap.PAGESIZE] += 1  # a written page: a private copy the file does not hold
    expected[10 * mmap.PAGESIZE] += 1
    assert FileViews().viewed(view[100:200]) and not FileViews().viewed(expected)
    assert resident_kib(file) >= 32 * mmap.PAGESIZE // 1024
    release_read_pages([view])
    if file_views._pagemap_tells_private_pages():  # else (a sandboxed /proc) read pages stay, by design
        assert resident_kib(file) <= mmap.PAGESIZE // 1024  # the written page alone
    assert torch.equal(view, expected)  # read again from the page cache; the written byte kept
    with open(file, "rb") as f:  # read-only: writing a weight into it at refresh would fault
        read_only = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the buffer is not writable
        assert not FileViews().viewed(torch.frombuffer(read_only, dtype=torch.uint8))


def test_where_pagemap_cannot_tell_written_pages_nothing_is_released(tmp_path, monkeypatch):
    import mmap

    file = tmp_path / "weights.bin"
    file.write_bytes(bytes(8 * mmap.PAGESIZE))
    with open(file, "rb") as f:
        view = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
    view[3 * mmap.PAGESIZE] = 7
    zeros = lambda first, last: torch.zeros(last - first, dtype=torch.int64)  # noqa: E731  (a sandbox's pagemap)
    monkeypatch.setattr(file_views, "_pagemap", zeros)
    file_views._pagemap_tells_private_pages.cache_clear()
    try:
        file_views.release_read_pages([view])
    finally:
        file_views._pagemap_tells_private_pages.cache_clear()
    assert view[3 * mmap.PAGESIZE] == 7


def pretrained_flux(tmp_path, target, prepare, prepare_twin=None):
    """The bf16 tiny Flux pipeline saved to ``tmp_path`` and loaded back with ``from_pretrained`` (its weights view
    their files), with ``prepare(pipe)`` applied, and the resident output on ``target`` of a copy with
    ``prepare_twin`` (default ``prepare``) applied.

    The reference runs on a second copy, saved beside it and loaded the same way: moving a pipeline to a GPU and back
    leaves its weights in memory of their own, no longer views of the files, and a copy of other files keeps the
    page counts of ``tmp_path``'s files this pipeline's own."""
    from diffusers import FluxPipeline

    pipe = make_flux_pipeline()
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(tmp_path)
    pipe.save_pretrained(tmp_path / "twin")
    os.sync()  # as files written long ago: pages written but not yet on disk cannot leave memory
    twin, pipe = (FluxPipeline.from_pretrained(path, dtype=torch.bfloat16) for path in (tmp_path / "twin", tmp_path))
    (prepare_twin or prepare)(twin)
    prepare(pipe)
    return pipe, resident_run(twin, lambda: run_flux(twin), target)


@torch.inference_mode()
def test_weights_from_pretrained_stay_views_of_their_files(tmp_path, target):
    def edit(pipe):  # written before dispatch: its pages are private copies, which must be kept
        pipe.transformer.transformer_blocks[1].ff.net[2].weight.mul_(0.5)

    pipe, reference = pretrained_flux(tmp_path, target, edit)
    weights = {name: p.clone() for name, p in pipe.transformer.named_parameters()}
    handle = dispatch_pipeline(pipe, "layerwise", target, compression="lossless", progress=False)
    units = streamed(handle)
    assert units and all(isinstance(u.host, MappedHost) for u in units)
    file = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    if file_views._pagemap_tells_private_pages():  # else (a sandboxed /proc) read pages stay, by design
        assert resident_kib(file) < file.stat().st_size / 1024 / 4  # packing read it; the pages it read left again
    assert private_kib(file) > 0
    for _ in range(2):
        assert torch.equal(run_flux(pipe).cpu(), reference)
    handle.remove()
    files = FileViews()  # the streamed blocks' as from_pretrained left them: views of their file, the edit included
    for name, p in pipe.transformer.named_parameters():
        assert torch.equal(p, weights[name]), name
        assert files.viewed(p) or not name.startswith(("transformer_blocks.", "single_transformer_blocks.")), name


def add_lora(pipe) -> None:
    """A seeded bf16 LoRA on the transformer's attention projections: its tensors in memory of their own."""
    from peft import LoraConfig

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    pipe.transformer.add_adapter(config)
    pipe.transformer.to(torch.bfloat16)


def assert_held_only_coded_with_lora(handle) -> None:
    """Every streamed block is held as its code, its base weights viewing the file and its LoRA tensors not."""
    units = streamed(handle)
    assert units and all(isinstance(u.host, MappedHost) for u in units)
    files = FileViews()
    for unit in units:
        in_file = [files.viewed(view) for view in unit.host.mapped]
        names = [ref.qualname for ref in unit.refs]
        assert any("lora_" in name for name in names), unit.path
        assert all(viewed != ("lora_" in name) for viewed, name in zip(in_file, names)), unit.path


@torch.inference_mode()
def test_a_lora_added_after_from_pretrained_is_held_beside_the_files_views(tmp_path, target):
    pipe, reference = pretrained_flux(tmp_path, target, add_lora)
    handle = dispatch_pipeline(pipe, "layerwise", target, compression="lossless", progress=False)
    assert_held_only_coded_with_lora(handle)
    for _ in range(2):
        assert torch.equal(run_flux(pipe).cpu(), reference)
    handle.remove()


@torch.inference_mode()
def test_a_lora_added_while_dispatched_leaves_the_blocks_held_only_as_their_code(tmp_path, target):
    pipe, reference = pretrained_flux(tmp_path, target, lambda pipe: None, prepare_twin=add_lora)
    handle = dispatch_pipeline(pipe, "layerwise", target, compression="lossless", progress=False)
    run_flux(pipe)
    add_lora(pipe)
    handle.refresh()  # modules were replaced: it dispatches again, from the file views remove() gives back
    assert_held_only_coded_with_lora(handle)
    for _ in range(2):
        assert torch.equal(run_flux(pipe).cpu(), reference)
    handle.remove()


@pytest.mark.parametrize("window", [1, 3])
@torch.inference_mode()
def test_blocks_built_in_memory_rest_in_the_offload_folder_hold_only_their_code_and_stay_bit_exact(tmp_path, target, window):
    # A float32 checkpoint read as bf16 builds every block in memory: without a folder each keeps its raw bytes beside
    # its code (1.71x); with one they rest in a file there, as blocks read from a bf16 checkpoint rest in theirs.
    from conftest import assert_restored, pipeline_state

    pipe = make_flux_pipeline()
    pipe.to(torch.bfloat16)
    before = pipeline_state(pipe)
    reference = resident_run(pipe, lambda: run_flux(pipe), target)
    folder = tmp_path / "offload"
    handle = dispatch_pipeline(pipe, "layerwise", target, window=window, compression="lossless", offload_folder=folder)
    units = streamed(handle)
    assert all(isinstance(u.host, MappedHost) and u.coded is not None and at_rest_in_file(u) for u in units)
    assert handle.runtime.host_bytes[0] == sum(u.nbytes for u in handle.runtime.host.units.values() if u not in units)
    assert f"{len(units)} held only coded" in str(handle.report())
    assert list(folder.iterdir()) == []  # the files have no name: nothing is left behind
    assert all(torch.equal(run_flux(pipe).cpu(), reference) for _ in range(2))
    edit_and_refresh(pipe, handle, target)
    pipe.transformer.load_state_dict(make_flux_pipeline().to(torch.bfloat16).transformer.state_dict())
    handle.remove()
    assert_restored(pipe, before)
    files = FileViews()
    assert not any(files.viewed(p) for p in pipe.transformer.parameters())  # memory of their own again


def test_offload_folder_is_refused_without_lossless_compression_or_where_it_cannot_be_made(tmp_path):
    from test_compression import make_dit

    model = make_dit()
    with pytest.raises(ValueError, match=r"offload_folder=.* codes none \(compression=None\); pass compression='lossless'"):
        dispatch_pipeline(model, "layerwise", "cpu", offload_folder=tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="offload_folder=.*a_file/offload' cannot be created"):
        dispatch_pipeline(model, "layerwise", "cpu", compression="lossless", offload_folder=tmp_path / "a_file" / "offload")
    assert not hasattr(model, "_offload_map_handle") and not hasattr(model.blocks[0], "_hf_hook")


@torch.inference_mode()
def test_a_failed_write_to_the_offload_folder_keeps_raw_bytes_with_one_warning(tmp_path, monkeypatch, caplog):
    from test_compression import _input, _reference, make_dit

    def full(buffer, folder):
        time.sleep(0.1)  # the packing threads all fail at once
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MappedHost, "written", full)
    monkeypatch.setattr(host_store, "PACK_THREADS", 4)
    model = make_dit()
    with caplog.at_level(logging.WARNING, logger="offload_map"):
        handle = dispatch_pipeline(model, "layerwise", "cpu", compression="lossless", offload_folder=tmp_path)
    assert caplog.text.count("cannot write to offload_folder") == 1 and "No space left" in caplog.text
    assert "built in memory" not in caplog.text  # said once, by the failed write
    assert all(isinstance(u.host, HostBuffer) and u.coded is not None for u in streamed(handle))
    assert torch.equal(model(_input()), _reference(0, "cpu"))
    handle.remove()


@torch.inference_mode()
def test_a_lora_added_while_dispatched_keeps_blocks_built_in_memory_held_only_as_their_code(tmp_path, target):
    # refresh() dispatches again from memory of the blocks' own: with an offload folder they rest there again.
    pipe, twin = (make_flux_pipeline().to(torch.bfloat16) for _ in range(2))
    add_lora(twin)
    reference = resident_run(twin, lambda: run_flux(twin), target)
    handle = dispatch_pipeline(pipe, "layerwise", target, compression="lossless", offload_folder=tmp_path, progress=False)
    run_flux(pipe)
    add_lora(pipe)
    handle.refresh()
    assert all(isinstance(u.host, MappedHost) for u in streamed(handle)) and handle.runtime.raw_beside_code == (0, 0)
    for _ in range(2):
        assert torch.equal(run_flux(pipe).cpu(), reference)
    handle.remove()


def test_an_offload_folder_on_a_filesystem_held_in_memory_is_named_in_a_warning(tmp_path, monkeypatch, caplog):
    # /tmp is tmpfs on many machines: its files are memory, so the folder would save nothing.
    from pathlib import Path

    from test_compression import make_dit

    folder = tmp_path / "wärme dir"  # as /proc/self/mounts writes it: UTF-8 as it is, a space as \\040
    mounts = f"/dev/vda / ext4 rw 0 0\ntmpfs {str(folder.resolve()).replace(' ', chr(92) + '040')} tmpfs rw 0 0\n"
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda p, *a, **k: mounts if str(p) == "/proc/self/mounts" else read_text(p, *a, **k))
    model = make_dit()
    with caplog.at_level(logging.WARNING, logger="offload_map"):
        handle = dispatch_pipeline(model, "layerwise", "cpu", compression="lossless", offload_folder=folder / "offload")
    assert "is on tmpfs, which holds its files in memory" in caplog.text
    handle.remove()


@torch.inference_mode()
def test_the_offload_folders_files_hold_no_descriptor_and_no_name_even_while_written(tmp_path, monkeypatch):
    # One descriptor per block (Python's mmap keeps its own) ran a 120-block model into the limit on open files, and
    # a file named until written could be left behind by a process killed while writing.
    from test_compression import _input, _reference, make_dit

    import offload_map.runtime.mapped_host as mapped_host

    folder, seen = tmp_path / "offload", []
    fdopen = os.fdopen

    def look(*args, **kwargs):
        seen.append(list(folder.iterdir()))
        return fdopen(*args, **kwargs)

    monkeypatch.setattr(mapped_host.os, "fdopen", look)
    model = make_dit()
    before = len(os.listdir("/proc/self/fd"))
    handle = dispatch_pipeline(model, "layerwise", "cpu", compression="lossless", offload_folder=folder)
    assert len(os.listdir("/proc/self/fd")) == before
    assert len(seen) == len(streamed(handle)) and all(names == [] for names in seen)
    assert torch.equal(model(_input()), _reference(0, "cpu"))
    handle.remove()


@torch.inference_mode()
def test_a_relative_offload_folder_is_the_one_at_dispatch_for_a_refresh_elsewhere(tmp_path, target, monkeypatch):
    pipe, twin = (make_flux_pipeline().to(torch.bfloat16) for _ in range(2))
    add_lora(twin)
    reference = resident_run(twin, lambda: run_flux(twin), target)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    handle = dispatch_pipeline(pipe, "layerwise", target, compression="lossless", offload_folder="offload", progress=False)
    monkeypatch.chdir(tmp_path / "b")
    add_lora(pipe)
    handle.refresh()  # dispatches again: into a/offload, which b/ does not hold
    assert handle.runtime.raw_beside_code == (0, 0) and not (tmp_path / "b" / "offload").exists()
    assert torch.equal(run_flux(pipe).cpu(), reference)
    handle.remove()


@torch.inference_mode()
def test_a_checkpoint_stored_in_another_dtype_rests_in_the_offload_folder(tmp_path, target, caplog):
    # The case the folder is for: weights= reads a float32 checkpoint into bf16 blocks built in memory.
    pipe, path = saved_pipeline(tmp_path, dtype=torch.float32)
    reference = resident_run(pipe, lambda: run_flux(pipe), target)
    with caplog.at_level(logging.WARNING, logger="offload_map"):
        handle = dispatch(pipe, path, target, offload_folder=tmp_path / "offload")
    assert "built in memory" not in caplog.text
    assert all(isinstance(u.host, MappedHost) and at_rest_in_file(u) for u in streamed(handle))
    assert handle.runtime.raw_beside_code == (0, 0)
    assert torch.equal(run_flux(pipe).cpu(), reference)
    handle.remove()
