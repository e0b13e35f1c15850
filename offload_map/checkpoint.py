"""Reading safetensors checkpoints straight into place: headers first, then bytes into their destination.

A checkpoint is a ``.safetensors`` file, or a directory holding one, several shards, or shards with an
index (``*.safetensors.index.json``), as ``save_pretrained`` writes them. Everything is validated from the
headers before a byte of weights is read: dtypes, shapes, offsets inside the file (a truncated shard is
caught here), duplicate and missing names. Reads go from the file into the caller's buffer
(``readinto``), so no intermediate CPU copy of the weights exists. Pickle-based files (``.bin``, ``.pt``,
``.ckpt``) are refused, never opened.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .device_map import parse_json

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, truncated, pickle-based, or does not match the model."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: file, absolute byte offset, length, dtype and shape."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class Checkpoint:
    """The tensors of a safetensors checkpoint, by name, read from the headers only.

    Args:
        path: a ``.safetensors`` file, a directory with safetensors shards (and optionally their index), or the
            ``*.safetensors.index.json`` to use where a directory holds several (precision variants).

    Raises:
        CheckpointError: see the module docstring; the message names the file and the tensor.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> path = tempfile.mkdtemp() + "/w.safetensors"
        >>> save_file({"weight": torch.ones(2, 3)}, path)
        >>> ckpt = Checkpoint(path)
        >>> out = torch.empty(2, 3)
        >>> ckpt.read_into("weight", out)
        >>> out.sum().item()
        6.0
    """

    def __init__(self, path: "str | os.PathLike") -> None:
        self.path = Path(path)
        self.tensors: dict[str, StoredTensor] = {}
        for file in _shard_files(self.path):
            for name, stored in _read_header(file).items():
                if name in self.tensors:
                    raise CheckpointError(f"{name!r} is stored twice: in {self.tensors[name].file} and in {file}")
                self.tensors[name] = stored

    def check(self, expected: dict[str, tuple[tuple[int, ...], torch.dtype]], where: str) -> None:
        """Raise unless every name in ``expected`` is stored with that shape (any dtype: it is converted)."""
        missing = [n for n in expected if n not in self.tensors]
        if missing:
            raise CheckpointError(
                f"{self.path} lacks {len(missing)} tensor(s) of {where}, e.g. {missing[:3]}; is it the checkpoint of "
                f"this model (it holds {len(self.tensors)} tensors, e.g. {list(self.tensors)[:3]})?"
            )
        for name, (shape, dtype) in expected.items():
            stored = self.tensors[name]
            if stored.shape != tuple(shape):
                raise CheckpointError(
                    f"{where}.{name}: the model expects shape {tuple(shape)}, {stored.file.name} stores {stored.shape}; "
                    "the model's config does not match the checkpoint"
                )
            if not stored.dtype.is_floating_point and stored.dtype != dtype:
                raise CheckpointError(f"{where}.{name}: stored as {stored.dtype}, the model expects {dtype}")

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read tensor ``name`` into the contiguous CPU tensor ``out`` (same shape; the dtype converts if it differs)."""
        stored = self.tensors[name]
        if out.dtype == stored.dtype:
            _read_exact(stored, out)
        else:  # a float checkpoint loaded at another precision: one tensor-sized temporary
            tmp = torch.empty(stored.shape, dtype=stored.dtype)
            _read_exact(stored, tmp)
            out.copy_(tmp)


def _read_exact(stored: StoredTensor, out: torch.Tensor) -> None:
    if not stored.nbytes:
        return
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    with open(stored.file, "rb", buffering=0) as f:
        f.seek(stored.offset)
        done = 0
        while done < stored.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{stored.file} ended {stored.nbytes - done} bytes early while reading; it is truncated")
            done += n


def _json(text: str, what: str):
    try:
        return parse_json(text, what)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _shard_files(path: Path) -> list[Path]:
    if path.suffix in _PICKLE_SUFFIXES:
        raise CheckpointError(f"{path} is a pickle-based checkpoint; offload_map only reads safetensors (pickle can run code). "
                              "Convert it once, e.g. with safetensors.torch.save_file(torch.load(...), 'model.safetensors')")
    if path.is_file() and not path.name.endswith(".safetensors.index.json"):
        return [path]
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    indexes = [path] if path.is_file() else sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{path} holds several indexes ({[i.name for i in indexes]}, e.g. precision variants); "
                              "pass the path of the one to load")
    if indexes:
        path = indexes[0].parent
        index = _json(indexes[0].read_text(), f"checkpoint index {indexes[0]}")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{indexes[0]} has no 'weight_map' of tensor name -> shard file")
        shards = sorted(set(weight_map.values()))
        bad = [s for s in shards if Path(s).name != s]
        if bad:
            raise CheckpointError(f"{indexes[0]} names shard {bad[0]!r} outside its directory")
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{indexes[0]} lists shard(s) that do not exist: {missing[:3]}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = f" (it holds pickle-based {pickled[:2]}, which offload_map does not read)" if pickled else ""
        raise CheckpointError(f"no *.safetensors file in {path}{hint}")
    return files


def _read_header(file: Path) -> dict[str, StoredTensor]:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file} is not a safetensors file (only {len(head)} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{file} is not a safetensors file, or is truncated (header of {length} bytes in a {size}-byte file)")
        header = _json(f.read(length).decode("utf-8", errors="replace"), f"the header of {file}")
    if not isinstance(header, dict):
        raise CheckpointError(f"the header of {file} is not a JSON object")
    data_start = 8 + length
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = _stored(file, name, info, data_start, size)
    end = data_start  # as safetensors requires: the data is tiled by the tensors, no overlap, no hole
    for name, stored in sorted(out.items(), key=lambda item: (item[1].offset, item[1].nbytes)):
        if stored.offset != end:
            raise CheckpointError(f"{file}: tensor {name!r} starts at byte {stored.offset}, expected {end} "
                                  "(tensors overlap or leave a hole); the file is corrupt")
        end += stored.nbytes
    return out


def _stored(file: Path, name: str, info: object, data_start: int, size: int) -> StoredTensor:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{file}: tensor {name!r} has {what}; the file is corrupt")

    if not isinstance(info, dict):
        raise bad("no description")
    dtype = DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if dtype is None:
        raise bad(f"an unsupported dtype {info.get('dtype')!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"a malformed shape {shape!r:.60}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"malformed data offsets {offsets!r:.60}")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"{offsets[1] - offsets[0]} bytes for shape {shape} of {info['dtype']} ({nbytes} expected)")
    if data_start + offsets[1] > size:
        raise CheckpointError(f"{file} is truncated: tensor {name!r} ends at byte {data_start + offsets[1]}, the file has {size}")
    return StoredTensor(file, data_start + offsets[0], nbytes, dtype, tuple(shape))
