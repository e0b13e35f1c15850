"""Reading safetensors checkpoints straight into place: headers first, then bytes into their destination.

A checkpoint is a ``.safetensors`` file, or a directory holding one, several shards, or shards with an
index (``*.safetensors.index.json``), as ``save_pretrained`` writes them. Every header is validated by
safetensors itself (``safe_open``: dtypes, shapes, offsets that tile the data, a truncated file) before a
byte of weights is read, then checked against the model (duplicate and missing names, shapes). Reads go
from the file into the caller's buffer (``readinto``), so no intermediate CPU copy of the weights exists.
Pickle-based files (``.bin``, ``.pt``, ``.ckpt``) are refused, never opened.

``mapped`` gives a tensor's bytes in place instead: a copy-on-write view of the file (``map_private``). Its
pages are read from the file when first touched and count in host memory only then; writes go to private
copies of the touched pages, never to the file. Ownership: each file's mapping is made once per
``Checkpoint``, here, held by it and by every view of it, and goes with the last of them. Pages not yet read
come from the file as it is when they are read: a file rewritten in place while views of it live is read as
rewritten, and one truncated kills the process on reading a page that vanished (as with any mapped file).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from ..mapping.schema import parse_json

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

logger = logging.getLogger("offload_map")


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
        self._maps: dict[Path, torch.Tensor | None] = {}  # file -> its private mapping as uint8, None if refused
        self._mapping = threading.Lock()  # packing threads map at once: each file once
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

    def mapped(self, name: str) -> torch.Tensor | None:
        """Tensor ``name`` as stored, a copy-on-write view of its file (see the module docstring); None where its
        bytes cannot be viewed as its dtype (an offset off the dtype's alignment) or the file cannot be mapped."""
        stored = self.tensors[name]
        itemsize = torch.empty(0, dtype=stored.dtype).element_size()
        if stored.offset % itemsize:
            return None
        with self._mapping:
            if stored.file not in self._maps:
                try:
                    self._maps[stored.file] = map_private(stored.file, stored.file.stat().st_size)
                except OSError as err:
                    logger.warning("offload_map: %s; the blocks read from it keep a copy in host memory", err)
                    self._maps[stored.file] = None
            whole = self._maps[stored.file]
        if whole is None:
            return None
        return whole[stored.offset : stored.offset + stored.nbytes].view(stored.dtype).view(stored.shape)


def map_private(file: "Path | str", nbytes: int) -> torch.Tensor:
    """The first ``nbytes`` of ``file`` as a ``uint8`` tensor viewing a private (copy-on-write) mapping of it: pages
    are read from the file when first touched, writes go to private copies of them, never the file, and no file
    descriptor stays open (one per mapping would run a model of many mapped files into the open-files limit).

    Raises:
        OSError: the file cannot be opened or mapped. A private writable mapping is charged in full against the
            kernel's commit limit, which strict overcommit may refuse: the caller then keeps a copy in memory.
    """
    try:
        storage = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=nbytes)
    except RuntimeError as err:
        raise OSError(f"cannot map {file} ({err})") from None
    return torch.empty(0, dtype=torch.uint8).set_(storage)


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
        raise CheckpointError(
            f"{path} is a pickle-based checkpoint; offload_map only reads safetensors (pickle can run code). "
            "Convert it once, e.g. with safetensors.torch.save_file(torch.load(...), 'model.safetensors')"
        )
    if path.is_file() and not path.name.endswith(".safetensors.index.json"):
        return [path]
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    indexes = [path] if path.is_file() else sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(
            f"{path} holds several indexes ({[i.name for i in indexes]}, e.g. precision variants); "
            "pass the path of the one to load"
        )
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
    try:
        with safe_open(str(file), framework="pt") as f:  # safetensors validates the whole header here
            described = {name: f.get_slice(name) for name in f.keys()}
            found = {name: (piece.get_dtype(), tuple(piece.get_shape())) for name, piece in described.items()}
    except SafetensorError as err:
        raise CheckpointError(f"{file} is not a valid safetensors file ({err}); it is corrupt or truncated") from None
    # safe_open does not expose the offsets it checked: read them from the header it accepted.
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    out = {}
    for name, (dtype_name, shape) in found.items():
        start, end = header[name]["data_offsets"]
        out[name] = StoredTensor(file, 8 + length + start, end - start, _torch_dtype(dtype_name, file, name), shape)
    return out


@functools.cache
def _dtype_of(name: str) -> torch.dtype | None:
    # safetensors' own table of dtype names, through its public API: deserialize an empty tensor of that dtype.
    header = json.dumps({"x": {"dtype": name, "shape": [0], "data_offsets": [0, 0]}}).encode()
    try:
        return safetensors.torch.load(struct.pack("<Q", len(header)) + header)["x"].dtype
    except Exception:  # noqa: BLE001 - a dtype torch cannot hold: the caller names it
        return None


def _torch_dtype(name: str, file: Path, tensor: str) -> torch.dtype:
    dtype = _dtype_of(name)
    if dtype is None:
        raise CheckpointError(f"{file}: tensor {tensor!r} is stored as {name}, which torch {torch.__version__} cannot hold")
    return dtype
