"""The device map: one placement per module path, printable, editable and serializable.

A ``DeviceMap`` is plain data. It names the target device, the window of device slots for streamed
blocks, each component's role, and an ordered list of entries (module path, placement, bytes, dtype).
A tensor belongs to the entry with the longest path that contains it, so ``"transformer": "gpu"`` plus
``"transformer.blocks.3": "layer-window"`` keeps everything of the transformer resident except block 3,
and ``"transformer.blocks.3.ff": "gpu"`` besides keeps that submodule of the streamed block resident, so
only the rest of block 3 goes through a slot (``strategy="auto"`` writes its split blocks this way).
Binding a map to a pipeline (``offload_map.planning.bind``) checks every rule against the pipeline;
this file holds the map as data and reads and writes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..collect.components import Role, discover_components
from ..collect.tensors import collect_tensors
from .ownership import assign_tensors, entry_module, owner_entry, owning_component, within
from .placement import Placement
from .schema import parse_json, typed
from .sizes import human_bytes

FORMAT_VERSION = 1
# How streamed blocks may be stored and copied: "lossless" codes each bf16 block in about 0.71 of its bytes
# (``runtime.codec``), decoded on the device bit for bit; "fp8" (lossy, opt-in) stores linear weights in float8
# with a scale per output channel (``runtime.fp8_host``), upcast on the device.
COMPRESSIONS = ("lossless", "fp8")


@dataclass(frozen=True)
class MapEntry:
    """One module path and where it lives. ``nbytes`` counts the tensors the entry owns (not nested entries')."""

    path: str
    placement: Placement
    nbytes: int = 0
    dtype: str = ""


@dataclass
class DeviceMap:
    """Where every module of a pipeline lives while it runs.

    Args:
        device: the target device, e.g. ``"cuda:0"`` or ``"cpu"``.
        components: component name -> role (``"dit"``, ``"encoder"``, ``"vae"``, ``"other"``).
        entries: module path -> ``MapEntry``, in pipeline order.
        window: device slots that each streamed component's ``"layer-window"`` blocks take turns in (>= 1).
        strategy: the strategy that compiled the map (informational).
        compression: how ``"layer-window"`` blocks are kept and copied: ``None`` (as they are), one kind for every
            streamed block, or ``{module path: kind or None}``, where a path is a component, a block, or a module
            holding blocks, and a block takes the value of the longest path that holds it (None: as it is), e.g.
            ``{"transformer": "fp8", "transformer.single_transformer_blocks": "lossless"}``. Kinds:
            ``"lossless"``, each block is kept in host memory coded in fewer bytes too, copied so and decoded on the
            device bit for bit (a block that does not compress, e.g. of float32 weights, streams as it is);
            ``"fp8"`` (lossy, opt-in), the blocks' linear weights are kept in float8 e4m3 with a scale per output
            channel, about half their bytes, and upcast on the device (outputs differ from the resident run).
            ``compression_of`` reads it.

    Example:
        >>> dmap = DeviceMap("cpu", {"transformer": Role.DIT}, window=2)
        >>> dmap["transformer"] = "gpu"
        >>> dmap["transformer"]
        <Placement.GPU: 'gpu'>
        >>> DeviceMap.from_json(dmap.to_json()) == dmap
        True
    """

    device: str
    components: dict[str, Role]
    entries: dict[str, MapEntry] = field(default_factory=dict)
    window: int = 2
    strategy: str = "custom"
    compression: "str | dict[str, str] | None" = None

    def __post_init__(self) -> None:
        self.components = {name: Role(role) for name, role in self.components.items()}
        check_window(self.window)
        self.compression = check_compression(self.compression, self.components)

    def compression_of(self, path: str) -> str | None:
        """The compression of the streamed block at module ``path`` (None: it streams as it is): the value of the
        longest path in ``compression`` that is ``path`` or holds it. For a component's name, what its blocks take
        unless a longer path says otherwise.

        Example:
            >>> dmap = DeviceMap("cpu", {"transformer": Role.DIT}, compression={"transformer": "fp8",
            ...     "transformer.single_transformer_blocks": "lossless", "transformer.single_transformer_blocks.0": None})
            >>> [dmap.compression_of(f"transformer.{p}") for p in ("transformer_blocks.3", "single_transformer_blocks.1",
            ...     "single_transformer_blocks.0")]
            ['fp8', 'lossless', None]
        """
        if not isinstance(self.compression, dict):
            return self.compression
        holder = owner_entry(path, self.compression)
        return None if holder is None else self.compression[holder]

    def __getitem__(self, path: str) -> Placement:
        return self._entry(path).placement

    def __setitem__(self, path: str, placement: "str | Placement") -> None:
        value = Placement.parse(placement, f"device map entry {path!r}")
        check_path(path)
        entry = self.entries.get(path)
        if entry is not None:
            self.entries[path] = replace(entry, placement=value)
            return
        # A new entry goes right after the entries of the module it is inside, so the map reads in module order.
        owner = owner_entry(path, self.entries)
        paths = list(self.entries)
        at = len(paths)
        if owner is not None:
            at = paths.index(owner) + 1
            while at < len(paths) and (not owner or paths[at].startswith(owner + ".")):
                at += 1
        items = list(self.entries.items())
        items.insert(at, (path, MapEntry(path, value)))
        self.entries = dict(items)

    def __delitem__(self, path: str) -> None:
        """Delete the entry of module ``path``; the tensors it held go to the entry of the module it is inside.

        Example:
            >>> dmap = DeviceMap("cpu", {"transformer": Role.DIT})
            >>> dmap["transformer"] = "gpu"; dmap["transformer.blocks.0"] = "layer-window"
            >>> del dmap["transformer.blocks.0"]; list(dmap.entries)
            ['transformer']
        """
        self._entry(path)  # a KeyError that lists the map's paths
        del self.entries[path]

    def __contains__(self, path: object) -> bool:
        return path in self.entries

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def _entry(self, path: str) -> MapEntry:
        try:
            return self.entries[path]
        except KeyError:
            raise KeyError(f"no device map entry {path!r}; entries start with {list(self.entries)[:6]}") from None

    def paths(self, placement: "str | Placement | None" = None) -> list[str]:
        """Entry paths in map order: all of them, or those with ``placement`` (a ``Placement`` or its name)."""
        if placement is None:
            return list(self.entries)
        wanted = Placement.parse(placement, "paths()")
        return [e.path for e in self.entries.values() if e.placement is wanted]

    def placements(self) -> dict[str, Placement]:
        """Entry path -> placement, in map order."""
        return {path: entry.placement for path, entry in self.entries.items()}

    def sized(self, owned: dict) -> "DeviceMap":
        """A copy of the map whose entries record the bytes and dtypes of the tensors they own (``owned``, from
        ``ownership.assign_tensors``)."""
        out = DeviceMap(self.device, dict(self.components), {}, self.window, self.strategy, _copied(self.compression))
        for path, entry in self.entries.items():
            refs = owned[path]
            dtypes = "+".join(sorted({str(r.tensor.dtype).removeprefix("torch.") for r in refs}))
            out.entries[path] = MapEntry(path, entry.placement, sum(r.nbytes for r in refs), dtypes)
        return out

    def copy(self) -> "DeviceMap":
        """An independent copy (entries are immutable, so a shallow copy of the tables suffices)."""
        entries, compression = dict(self.entries), _copied(self.compression)
        return DeviceMap(self.device, dict(self.components), entries, self.window, self.strategy, compression)

    def bytes_by_placement(self) -> dict[Placement, int]:
        """Bytes owned by each placement (every placement present, zero when unused)."""
        out = {p: 0 for p in Placement}
        for e in self.entries.values():
            out[e.placement] += e.nbytes
        return out

    def to_dict(self) -> dict:
        """A JSON-ready dict; ``DeviceMap.from_dict`` reads it back."""
        compression = {"compression": _copied(self.compression)} if self.compression else {}
        return {
            "version": FORMAT_VERSION,
            "device": self.device,
            "strategy": self.strategy,
            "window": self.window,
            **compression,
            "components": {n: r.value for n, r in self.components.items()},
            "entries": [
                {"path": e.path, "placement": e.placement.value, "bytes": e.nbytes, "dtype": e.dtype}
                for e in self.entries.values()
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceMap":
        """Read a map written by ``to_dict``, validating types and values (no code runs, nothing is unpickled).

        Raises:
            ValueError: a field is missing or of the wrong type, a role or placement is unknown, or a path repeats.
        """
        where = "device map"
        version = data.get("version") if isinstance(data, dict) else None
        if type(version) is not int or version != FORMAT_VERSION:
            raise ValueError(
                f"not an offload_map device map of version {FORMAT_VERSION} (a {type(data).__name__} with version {version!r:.40})"
            )
        comps = typed(data, "components", dict, where)
        for name, role in comps.items():
            if not isinstance(name, str) or not isinstance(role, str) or role not in {r.value for r in Role}:
                raise ValueError(
                    f"device map component {name!r:.80}: unknown role {role!r:.80}; expected one of {[r.value for r in Role]}"
                )
        strategy = typed({"strategy": "custom", **data}, "strategy", str, where)
        compression = data.get("compression")
        dmap = cls(typed(data, "device", str, where), comps, {}, typed(data, "window", int, where), strategy, compression)
        for i, raw in enumerate(typed(data, "entries", list, where)):
            if not isinstance(raw, dict):
                raise ValueError(f"device map entry #{i} must be an object, got a {type(raw).__name__}")
            path = check_path(typed(raw, "path", str, f"device map entry #{i}"))
            if path in dmap.entries:
                raise ValueError(f"device map entry {path!r} appears twice")
            nbytes = raw.get("bytes", 0)
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
                raise ValueError(f"device map entry {path!r}: bytes must be a non-negative int, got {nbytes!r}")
            placement = Placement.parse(typed(raw, "placement", str, f"device map entry {path!r}"), f"device map entry {path!r}")
            dmap.entries[path] = MapEntry(path, placement, nbytes, str(raw.get("dtype", "")))
        return dmap

    def to_json(self, indent: int | None = 1) -> str:
        """The map as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "DeviceMap":
        """Parse JSON text written by ``to_json``; see ``from_dict`` for the checks."""
        return cls.from_dict(parse_json(text, "device map"))

    def save(self, path: "str | Path") -> None:
        """Write the map as JSON to ``path``."""
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: "str | Path") -> "DeviceMap":
        """Read a map saved with ``save``."""
        return cls.from_json(Path(path).read_text())

    def to_accelerate_device_map(self, pipeline: object) -> dict[str, dict[str, "int | str"]]:
        """Per component, accelerate's ``device_map`` form: disjoint module or tensor names -> device.

        ``"gpu"`` maps to the device index (``"cpu"`` when the target is the CPU); ``"cpu-pinned"`` and
        ``"layer-window"`` map to ``"cpu"``, where accelerate would offload them. An entry with entries
        nested inside it is written as the tensors it owns, so keys never overlap (accelerate's rule).
        Names are relative to the component, as ``accelerate.dispatch_model(component, device_map=...)``
        expects.

        Raises:
            ValueError: an entry names no module of ``pipeline``, or some tensor is covered by no entry.
        """
        found = discover_components(pipeline)
        comps = {c.name: c for c in found.components.values()}
        modules = {path: entry_module(path, comps, self.components) for path in self.entries}
        assign_tensors(self.placements(), collect_tensors(found))  # every tensor covered, or the error says which
        index = self.device.partition(":")[2] or "0"
        out: dict[str, dict[str, int | str]] = {name: {} for name in self.components}
        for path, entry in self.entries.items():
            comp = owning_component(path, self.components)
            value = int(index) if entry.placement is Placement.GPU and self.device != "cpu" else "cpu"
            for name in _disjoint_names(path, modules[path], self.entries):
                out[comp][name[len(comp) :].lstrip(".") if comp else name] = value
        return out

    def __str__(self) -> str:
        return format_table(self)


def _disjoint_names(path: str, module, units: dict) -> list[str]:
    # The module itself if no entry is nested in it; else its own tensors and, recursively, its children
    # that are not entries of their own.
    join = (lambda name: f"{path}.{name}") if path else (lambda name: name)
    if not any(other != path and (not path or other.startswith(path + ".")) for other in units):
        return [path]
    names = [join(n) for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None]
    for child_name, child in module.named_children():
        if join(child_name) not in units:
            names += _disjoint_names(join(child_name), child, units)
    return names


def check_path(path: object) -> str:
    """Return ``path`` if it is a module path (``""`` for the root, else dot-separated names), else a ValueError."""
    if not isinstance(path, str) or (path and "" in path.split(".")):
        raise ValueError(f"device map entry {path!r} is not a module path; write paths like 'transformer.blocks.0'")
    return path


def check_compression(compression: object, components=None) -> "str | dict[str, str | None] | None":
    """Return ``compression`` if it is ``None``, one of ``COMPRESSIONS``, or a dict of module paths (components, blocks,
    modules holding blocks; within ``components`` if given) to one of them or None (a dict of nothing but None gives
    ``None``), else raise a ValueError that says what to pass. ``check_compressed_paths`` checks the paths against the
    pipeline's blocks."""
    if isinstance(compression, dict):
        for path, kind in compression.items():
            check_path(path)
            if kind is not None and kind not in COMPRESSIONS:
                raise ValueError(
                    f"compression[{path!r:.80}] must be one of {list(COMPRESSIONS)} or None (as it is), got {kind!r:.40}"
                )
            if components is not None and not any(within(path, c) for c in components):
                raise ValueError(
                    f"compression names {path!r:.80}, which is in no component of the map; components: {sorted(components)}"
                )
        if not any(compression.values()):
            return None  # every block as it is: no compression
    elif compression is not None and compression not in COMPRESSIONS:
        raise ValueError(
            f"compression must be None, one of {list(COMPRESSIONS)} or {{module path: one of them or None}}, "
            f"got {compression!r:.40}"
        )
    return compression


def check_compressed_paths(compression: "str | dict | None", found) -> None:
    """Raise a ValueError if a path of ``compression`` is none of the components of ``found`` (``PipelineModules``),
    their blocks, or modules holding blocks (block lists): a module inside a block cannot be coded apart from its
    block. Checked against the pipeline rather than a map, so a key means the same whether or not a map streams
    its block."""
    if not isinstance(compression, dict) or all(path in found.components for path in compression):
        return
    blocks = [path for comp in found.components.values() for path, _ in comp.known_blocks()]
    for path in compression:
        if path in found.components or any(within(b, path) for b in blocks):
            continue
        block = next((b for b in blocks if within(path, b)), None)
        where = f"; it is inside block {block!r}, which is coded as one" if block is not None else ""
        # A block list's own blocks (a wrong index), else the component's, else any.
        near = (
            [b for b in blocks if b.rpartition(".")[0] == path.rpartition(".")[0]]
            or [b for b in blocks if b.startswith(owning_component(path, found.components) + ".")]
            or blocks
        )
        example = f" (e.g. {near[0]!r}{f' to {near[-1]!r}' if len(near) > 1 else ''})" if near else ""
        raise ValueError(
            f"compression names {path!r:.80}, which is no component, block or block list of the pipeline{where}: name "
            f"a component, a block{example} or a module holding blocks"
        )


def _copied(compression):
    return dict(compression) if isinstance(compression, dict) else compression


def check_window(window: object) -> int:
    """Return ``window`` if it is an int >= 1, else raise a ValueError that says what to pass."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an int >= 1 (device slots of each streamed component), got {window!r}")
    return window


_NUMBERED = re.compile(r"^(.*\.)(\d+)$")


def _rows(dmap: DeviceMap) -> list[tuple[str, str, str, str]]:
    # Consecutive numbered entries collapse into one row only when they are alike: same placement, dtype and
    # bytes, so "4 x 134.4 KiB" is exact, never an average.
    rows: list[list] = []
    for e in dmap.entries.values():
        m = _NUMBERED.match(e.path)
        last = rows[-1] if rows else None
        if (
            m
            and last
            and last[5] == m.group(1)
            and last[1] is e.placement
            and last[3] == e.dtype
            and last[2] == e.nbytes
            and last[6] + 1 == int(m.group(2))
        ):
            last[6] = int(m.group(2))
            last[4] += 1
            continue
        rows.append([e.path, e.placement, e.nbytes, e.dtype, 1, m.group(1) if m else None, int(m.group(2)) if m else -1])
    out = []
    for path, placement, nbytes, dtype, count, _prefix, end in rows:
        if count > 1:
            path = f"{path}..{end}"
        size = f"{count} x {human_bytes(nbytes)}" if count > 1 else human_bytes(nbytes)
        out.append((path or "(root)", placement.value, size, dtype))
    return out


def format_table(dmap: DeviceMap) -> str:
    """The map as an aligned text table, consecutive numbered blocks collapsed, with totals."""
    rows = [("module", "placement", "bytes", "dtype"), *_rows(dmap)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    if isinstance(dmap.compression, dict):
        coded = ", compression " + ", ".join(f"{name or '(root)'} {kind or 'none'}" for name, kind in dmap.compression.items())
    else:
        coded = f", {dmap.compression} compression" if dmap.compression else ""
    lines = [f"DeviceMap -> {dmap.device} (strategy {dmap.strategy}, window {dmap.window}{coded})"]
    if not dmap.device.startswith("cuda"):
        lines.append(f"  (the target is {dmap.device!r}: 'gpu' means resident there)")
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    totals = dmap.bytes_by_placement()
    lines.append("  totals: " + " | ".join(f"{p.value} {human_bytes(totals[p])}" for p in Placement))
    return "\n".join(lines)
