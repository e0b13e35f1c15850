"""Fuzzing the untrusted-input surfaces with hypothesis.

Surfaces: ``DeviceMap.from_dict``/``from_json``, ``DeviceProfile.from_dict``, the planner
(``plan_blocks``), ``mapping.sizes.parse_size`` and ``dispatch_pipeline`` with an edited device map.

Each surface has a small reference of its documented contract (``_map_problem``, ``_profile_problem``,
``_expected_size``): the library must accept exactly what the reference accepts, raise ``ValueError``
for the rest, and nothing else may escape. Every run is derandomized, so CI sees the same cases.

The bugs the fuzzers found are fixed; their minimal reproductions are regression tests at the bottom.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from contextlib import contextmanager
from functools import lru_cache

import pytest
import torch
from accelerate.utils import convert_file_size_to_int
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from offload_map import Placement, Role, compile_device_map, dispatch_pipeline
from offload_map.demo import make_tiny_pipeline
from offload_map.mapping.device_map import FORMAT_VERSION, DeviceMap
from offload_map.mapping.schema import MAX_SIZE
from offload_map.mapping.sizes import parse_size
from offload_map.planning.cost_model import BlockCost, ModelCost, floor_s, simulate
from offload_map.planning.planner import (
    MIN_BANDWIDTH,
    WINDOWS,
    BudgetTooSmall,
    minimum_memory,
    plan_blocks,
    plan_memory,
)
from offload_map.planning.profile import DeviceProfile


def fuzz(max_examples: int):
    """The settings of every fuzz test: reproducible (derandomized), no per-example deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _outcome(fn, *args, **kwargs):
    """``("ok", result)`` or ``("error", exception)`` for ``fn(*args, **kwargs)``."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the caller judges which exceptions are allowed
        return "error", err


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------
# Random JSON-like data

NAN, INF = float("nan"), float("inf")
ROLE_VALUES = [r.value for r in Role]
PLACEMENT_VALUES = [p.value for p in Placement]
FIELD_NAMES = [
    "version",
    "device",
    "strategy",
    "window",
    "components",
    "entries",
    "path",
    "placement",
    "bytes",
    "dtype",
    "device_name",
    "h2d_bytes_per_s",
    "models",
    "blocks",
    "compute_s",
    "other_bytes",
    "other_compute_s",
    "activation_bytes",
]
SPECIAL_SCALARS = [
    0,
    1,
    -1,
    2,
    3,
    2**31,
    2**53 + 1,
    2**63,
    -(2**63),
    10**400,
    -(10**400),
    1.0,
    1.5,
    -0.0,
    0.5,
    1e-300,
    5e-324,
    1e308,
    NAN,
    INF,
    -INF,
    True,
    False,
    None,
    "",
    "1",
    "2",
    "-1",
    "nan",
    "gpu",
    "cpu",
    "cuda:0",
    "cpu-pinned",
    "layer-window",
    "layer_window",
    "GPU",
    " gpu",
    "dit",
    "DIT",
    "encoder",
    "vae",
    "other",
    "unet",
    "\x00",
    "\ud800",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(SPECIAL_SCALARS),
)
keys = st.one_of(st.text(max_size=8), st.sampled_from(FIELD_NAMES))
# JSON can only produce string keys; Python callers of from_dict can pass any hashable key.
python_keys = st.one_of(keys, st.integers(-3, 3), st.none(), st.booleans(), st.floats(allow_nan=False))

json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=16,
)
python_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.dictionaries(python_keys, inner, max_size=5),
    max_leaves=12,
)


def _mutant_value(draw, special: list) -> object:
    """A replacement value: one of ``special`` (targeted at the field), or anything JSON-like."""
    return draw(st.one_of(st.sampled_from(special), json_values))


# --------------------------------------------------------------------------------------------------
# 1. DeviceMap.from_dict / from_json


def _map_problem(data: object) -> str | None:
    """Why ``data`` is not a valid device map dict (the documented format), or None if it is.

    Leniencies the library has on purpose and this reference copies: ``dtype`` may be of any type (it is
    read through ``str``), ``strategy``/``bytes``/``dtype`` may be missing, and unknown keys are ignored.
    """
    if not isinstance(data, dict):
        return "not an object"
    if "strategy" in data and not isinstance(data["strategy"], str):
        return "strategy"
    if not (_is_int(data.get("version")) and data["version"] == FORMAT_VERSION):
        return "version"
    comps = data.get("components")
    if not isinstance(comps, dict):
        return "components"
    for name, role in comps.items():
        if not isinstance(name, str) or not isinstance(role, str) or role not in ROLE_VALUES:
            return f"component {name!r}"
    if not isinstance(data.get("device"), str):
        return "device"
    window = data.get("window")
    if not _is_int(window) or window < 1:
        return "window"
    entries = data.get("entries")
    if not isinstance(entries, list):
        return "entries"
    seen = set()
    for raw in entries:
        if not isinstance(raw, dict):
            return "entry not an object"
        path = raw.get("path")
        if not isinstance(path, str):
            return "path"
        if path and "" in path.split("."):
            return f"path {path!r} has an empty name"
        if path in seen:
            return f"duplicate {path!r}"
        seen.add(path)
        nbytes = raw.get("bytes", 0)
        if not _is_int(nbytes) or nbytes < 0:
            return f"bytes of {path!r}"
        placement = raw.get("placement")
        if not isinstance(placement, str) or placement not in PLACEMENT_VALUES:
            return f"placement of {path!r}"
    return None


def _normalized_map_dict(data: dict) -> dict:
    """What ``to_dict`` writes for a valid map dict: defaults filled in, unknown keys gone."""
    return {
        "version": FORMAT_VERSION,
        "device": data["device"],
        "strategy": str(data.get("strategy", "custom")),
        "window": data["window"],
        "components": dict(data["components"]),
        "entries": [
            {"path": e["path"], "placement": e["placement"], "bytes": e.get("bytes", 0), "dtype": str(e.get("dtype", ""))}
            for e in data["entries"]
        ],
    }


def _check_round_trips(dmap: DeviceMap) -> None:
    again = DeviceMap.from_dict(dmap.to_dict())
    assert again == dmap
    assert again.to_dict() == dmap.to_dict()
    assert DeviceMap.from_json(dmap.to_json()) == dmap
    assert DeviceMap.from_json(dmap.to_json(indent=None)) == dmap
    assert isinstance(str(dmap), str)  # the table prints whatever the parser accepted


def _parse_checked(parse, data: object, problem: str | None, what: str):
    """``parse(data)`` under the contract every ``from_dict`` shares: the input is left as it was, and an input
    rejected is rejected with a ValueError and is invalid (``problem``). Returns the parsed value, or None when
    the input was rejected."""
    before = repr(data)
    kind, result = _outcome(parse, data)
    assert repr(data) == before, "from_dict modified its input"
    if kind != "error":
        return result
    if not isinstance(result, ValueError):
        raise AssertionError(f"from_dict raised an undocumented {type(result).__name__}: {result!r}") from result
    assert problem is not None, f"a valid {what} was rejected: {result}"
    event("rejected (ValueError)")
    return None


def _check_map_dict(data: object) -> None:
    """The contract of ``DeviceMap.from_dict`` on one input."""
    problem = _map_problem(data)
    result = _parse_checked(DeviceMap.from_dict, data, problem, "map")
    if result is None:
        return
    assert problem is None, f"an invalid map ({problem}) was accepted: {result!r}"
    event("accepted")
    assert isinstance(result, DeviceMap)
    assert result.to_dict() == _normalized_map_dict(data)
    _check_round_trips(result)


@st.composite
def valid_map_dicts(draw) -> dict:
    components = draw(
        st.dictionaries(
            st.one_of(st.text(max_size=10), st.sampled_from(["transformer", "vae", ""])), st.sampled_from(ROLE_VALUES), max_size=4
        )
    )
    module_paths = st.sampled_from(["transformer", "transformer.blocks.0", "transformer.blocks.1", "vae", ""])
    paths = draw(
        st.lists(
            st.one_of(st.text(max_size=16), module_paths).filter(lambda p: not p or "" not in p.split(".")),
            unique=True,
            max_size=8,
        )
    )
    entries = []
    for path in paths:
        entry = {"path": path, "placement": draw(st.sampled_from(PLACEMENT_VALUES))}
        if draw(st.booleans()):
            entry["bytes"] = draw(st.one_of(st.integers(0, 2**40), st.integers(0, 2**200), st.just(0)))
        if draw(st.booleans()):
            entry["dtype"] = draw(st.one_of(st.sampled_from(["float32", "bfloat16", "float16+float32"]), st.text(max_size=8)))
        entries.append(entry)
    data = {
        "version": FORMAT_VERSION,
        "device": draw(st.one_of(st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:7"]), st.text(max_size=8))),
        "window": draw(st.one_of(st.integers(1, 8), st.integers(1, 2**80))),
        "components": components,
        "entries": entries,
    }
    if draw(st.booleans()):
        data["strategy"] = draw(
            st.one_of(st.sampled_from(["none", "model", "layerwise", "auto", "custom"]), st.text(max_size=10))
        )
    if draw(st.booleans()):
        data["x-" + draw(st.text(max_size=6))] = draw(json_values)  # unknown keys are ignored
    return data


WINDOW_VALUES = [0, -1, -(2**70), 1, 3, 2**70, True, False, 1.0, 1.5, 2.0, "2", None, [], [2], {}, NAN, INF]
BYTES_VALUES = [-1, -(2**70), 0, 2**70, 1.0, 1.5, True, False, "10", None, NAN, INF, [1], {}]
VERSION_VALUES = [0, 2, -1, 1, "1", 1.0, True, False, None, [], {}, [1], NAN, 2**64 + 1]
PLACEMENT_MUTANTS = [*PLACEMENT_VALUES, "GPU", "gpu ", "cpu", "cuda", "", "layer_window", None, 1, True, ["gpu"], {"gpu": 1}]
ROLE_MUTANTS = [*ROLE_VALUES, "DIT", "dit ", "unet", "", None, 1, True, 1.5, ["dit"], {}, {"dit": 1}, []]
MAP_MUTATIONS = [
    "top",
    "delete_top",
    "window",
    "version",
    "entry_field",
    "entry_delete_field",
    "entry_replace",
    "entries_replace",
    "duplicate",
    "bytes",
    "placement",
    "role",
    "add_component",
    "components_replace",
]


@st.composite
def mutated_map_dicts(draw) -> dict:
    data = copy.deepcopy(draw(valid_map_dicts()))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(MAP_MUTATIONS))
        note(f"mutation {op}")
        entries = data.get("entries") if isinstance(data.get("entries"), list) else None
        comps = data.get("components") if isinstance(data.get("components"), dict) else None
        dict_entries = [e for e in entries or [] if isinstance(e, dict)]
        if op == "top":
            data[draw(st.sampled_from(FIELD_NAMES[:6]))] = draw(json_values)
        elif op == "delete_top":
            data.pop(draw(st.sampled_from(FIELD_NAMES[:6])), None)
        elif op == "window":
            data["window"] = _mutant_value(draw, WINDOW_VALUES)
        elif op == "version":
            data["version"] = _mutant_value(draw, VERSION_VALUES)
        elif op == "entry_field" and dict_entries:
            entry = draw(st.sampled_from(dict_entries))
            entry[draw(st.sampled_from(["path", "placement", "bytes", "dtype", "other"]))] = draw(json_values)
        elif op == "entry_delete_field" and dict_entries:
            draw(st.sampled_from(dict_entries)).pop(draw(st.sampled_from(["path", "placement", "bytes", "dtype"])), None)
        elif op == "entry_replace" and entries:
            entries[draw(st.integers(0, len(entries) - 1))] = draw(json_values)
        elif op == "entries_replace":
            data["entries"] = draw(json_values)
        elif op == "duplicate" and dict_entries:
            twin = dict(draw(st.sampled_from(dict_entries)))
            twin["placement"] = draw(st.sampled_from(PLACEMENT_VALUES))
            entries.insert(draw(st.integers(0, len(entries))), twin)
        elif op == "bytes" and dict_entries:
            draw(st.sampled_from(dict_entries))["bytes"] = _mutant_value(draw, BYTES_VALUES)
        elif op == "placement" and dict_entries:
            draw(st.sampled_from(dict_entries))["placement"] = _mutant_value(draw, PLACEMENT_MUTANTS)
        elif op == "role" and comps:
            comps[draw(st.sampled_from(sorted(comps)))] = _mutant_value(draw, ROLE_MUTANTS)
        elif op == "add_component" and comps is not None:
            comps[draw(st.text(max_size=6))] = _mutant_value(draw, ROLE_MUTANTS)
        elif op == "components_replace":
            data["components"] = draw(json_values)
    return data


@fuzz(1200)
@given(st.one_of(mutated_map_dicts(), json_values, valid_map_dicts()))
def test_device_map_from_dict_accepts_exactly_the_valid_maps(data):
    _check_map_dict(data)


@fuzz(300)
@given(st.one_of(python_values, st.dictionaries(python_keys, python_values, max_size=6)))
def test_device_map_from_dict_on_arbitrary_python_data(data):
    _check_map_dict(data)


@fuzz(400)
@given(valid_map_dicts())
def test_valid_device_maps_round_trip(data):
    dmap = DeviceMap.from_dict(data)
    assert DeviceMap.from_dict(json.loads(json.dumps(dmap.to_dict()))) == dmap
    built = DeviceMap(dmap.device, dict(dmap.components), window=dmap.window, strategy=dmap.strategy)
    for path, entry in dmap.entries.items():
        built[path] = entry.placement
        built.entries[path] = entry
    assert built == dmap
    _check_round_trips(built)


def _text_mutations(draw, text: str) -> str:
    op = draw(st.sampled_from(["none", "truncate", "insert", "delete", "replace"]))
    if op == "none" or not text:
        return text
    at = draw(st.integers(0, len(text) - 1))
    if op == "truncate":
        return text[:at]
    if op == "insert":
        return text[:at] + draw(st.one_of(st.sampled_from(list('{}[]",:0-e.ntfNI\\ ')), st.text(max_size=3))) + text[at:]
    if op == "delete":
        return text[:at] + text[at + 1 :]
    return text[:at] + draw(st.text(min_size=1, max_size=2)) + text[at + 1 :]


@st.composite
def map_json_texts(draw) -> "str | bytes":
    source = draw(st.sampled_from(["valid", "mutated", "random", "text"]))
    if source == "text":
        text = draw(st.text(max_size=40))
    else:
        data = draw({"valid": valid_map_dicts(), "mutated": mutated_map_dicts(), "random": json_values}[source])
        text = json.dumps(data, indent=draw(st.sampled_from([None, 1])), ensure_ascii=draw(st.booleans()))
        text = _text_mutations(draw, text)
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(st.just(text.encode("utf-8", "surrogatepass")), st.binary(max_size=20)))
    return text


@fuzz(800)
@given(map_json_texts())
def test_device_map_from_json_raises_only_value_error(text):
    kind, parsed = _outcome(json.loads, text)
    if kind == "error":
        assert isinstance(parsed, ValueError)  # json's own errors (and bad UTF-8) are ValueErrors
        with pytest.raises(ValueError):
            DeviceMap.from_json(text)
        event("not JSON")
        return
    problem = _map_problem(parsed)
    kind, result = _outcome(DeviceMap.from_json, text)
    if kind == "error":
        if not isinstance(result, ValueError):
            raise AssertionError(f"from_json raised an undocumented {type(result).__name__}: {result!r}") from result
        assert problem is not None, f"valid JSON map rejected: {result}"
        event("rejected (ValueError)")
        return
    assert problem is None, f"invalid map ({problem}) accepted"
    assert result == DeviceMap.from_dict(parsed)
    event("accepted")


# --------------------------------------------------------------------------------------------------
# 2. DeviceProfile.from_dict

_FLOAT_MAX_INT = int(sys.float_info.max)
_PROFILE_NUMBERS = {"bytes", "compute_s", "other_bytes", "other_compute_s", "activation_bytes", "h2d_bytes_per_s"}


def _number_problem(value: object, positive: bool = False) -> str | None:
    """Why ``value`` is not a finite non-negative (positive) number that fits a float, or None."""
    if not _is_number(value):
        return "not a number"
    if value < 0:
        return "negative"
    if isinstance(value, int) and value > _FLOAT_MAX_INT:
        return "too large for a float"  # the documented contract: a finite number; the library reads floats
    if math.isnan(value) or math.isinf(value):
        return "not finite"
    if positive and value == 0:
        return "not positive"
    return None


def _count_problem(value: object) -> str | None:
    """Why ``value`` is not a byte count (a non-negative int, never a float), or None."""
    return None if _is_int(value) and 0 <= value <= MAX_SIZE else "not an int in 0..MAX_SIZE"


def _profile_problem(data: object) -> str | None:
    """Why ``data`` is not a valid profile dict, or None."""
    if not isinstance(data, dict):
        return "not an object"
    if not isinstance(data.get("device_name"), str):
        return "device_name"
    if _number_problem(data.get("h2d_bytes_per_s")) or data["h2d_bytes_per_s"] < MIN_BANDWIDTH:
        return "h2d_bytes_per_s"
    models = data.get("models")
    if not isinstance(models, dict):
        return "models"
    for name, cost in models.items():
        if not isinstance(cost, dict):
            return f"model {name!r}"
        blocks = cost.get("blocks")
        if not isinstance(blocks, list) or not blocks:
            return f"blocks of {name!r}"
        for raw in blocks:
            if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
                return f"a block of {name!r}"
            if _count_problem(raw.get("bytes")) or _number_problem(raw.get("compute_s")):
                return f"a block number of {name!r}"
            splits = raw.get("splits", [])  # optional: ascending distinct ints strictly inside the block
            if (
                not isinstance(splits, list)
                or not all(_is_int(p) and 0 < p < raw["bytes"] for p in splits)
                or splits != sorted(set(splits))
            ):
                return f"the split points of a block of {name!r}"
        for key, check in (
            ("other_bytes", _count_problem),
            ("other_compute_s", _number_problem),
            ("activation_bytes", _count_problem),
        ):
            if check(cost.get(key)):
                return f"{key} of {name!r}"
    return None


def _check_profile_dict(data: object) -> None:
    problem = _profile_problem(data)
    result = _parse_checked(DeviceProfile.from_dict, data, problem, "profile")
    if result is None:
        return
    assert problem is None, f"an invalid profile ({problem}) was accepted: {result!r}"
    event("accepted")
    assert isinstance(result, DeviceProfile)
    assert math.isfinite(result.h2d_bytes_per_s) and result.h2d_bytes_per_s > 0
    for cost in result.models.values():
        assert cost.blocks
        numbers = [cost.other_bytes, cost.other_compute_s, cost.activation_bytes]
        numbers += [x for b in cost.blocks for x in (b.nbytes, b.compute_s)]
        assert all(math.isfinite(x) and x >= 0 for x in numbers), numbers
        assert all(isinstance(x, int) for x in (cost.other_bytes, cost.activation_bytes, *(b.nbytes for b in cost.blocks)))
    assert DeviceProfile.from_dict(result.to_dict()) == result
    assert DeviceProfile.from_dict(json.loads(json.dumps(result.to_dict()))) == result


finite_floats = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
safe_bytes = st.one_of(st.integers(0, 2**53), st.sampled_from([0, 1, 2**53]))


@st.composite
def block_costs(draw) -> BlockCost:
    nbytes = draw(safe_bytes)
    splits = draw(st.lists(st.integers(1, nbytes - 1), max_size=3)) if nbytes > 1 else []
    return BlockCost(draw(st.text(max_size=12)), nbytes, draw(finite_floats), tuple(sorted(set(splits))))


@st.composite
def model_costs_for_profiles(draw) -> ModelCost:
    blocks = draw(st.lists(block_costs(), min_size=1, max_size=5))
    return ModelCost(tuple(blocks), draw(safe_bytes), draw(finite_floats), draw(safe_bytes))


profiles = st.builds(
    DeviceProfile,
    st.text(max_size=12),
    st.one_of(st.floats(min_value=MIN_BANDWIDTH, allow_nan=False, allow_infinity=False), st.integers(int(MIN_BANDWIDTH), 2**53)),
    st.dictionaries(st.text(max_size=8), model_costs_for_profiles(), max_size=3),
)

BASE_PROFILE = DeviceProfile("x", 1e9, {"m": ModelCost((BlockCost("b.0", 10, 1e-3, (4,)),), 0, 0.0, 0)})
SPLIT_MUTANTS = [[], [0], [10], [3, 3], [5, 2], [2.0], [True], ["2"], [-1], None, 4, {}, [1, 9]]
NUMBER_MUTANTS = [
    NAN,
    INF,
    -INF,
    -1,
    -1e-300,
    -0.0,
    0,
    0.0,
    1,
    1.5,
    5e-324,
    1e308,
    2**53 + 1,
    10**400,
    -(10**400),
    True,
    False,
    "1",
    "nan",
    None,
    [],
    [1],
    {},
]
PROFILE_MUTATIONS = [
    "top",
    "delete_top",
    "number",
    "number",
    "number",
    "model_replace",
    "blocks_replace",
    "block_replace",
    "block_field",
    "splits",
    "delete_field",
    "add_model",
]


@st.composite
def mutated_profile_dicts(draw) -> dict:
    base = draw(st.one_of(st.just(BASE_PROFILE), profiles))
    data = copy.deepcopy(base.to_dict())
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(PROFILE_MUTATIONS))
        note(f"mutation {op}")
        models = data.get("models") if isinstance(data.get("models"), dict) else {}
        costs = [c for c in models.values() if isinstance(c, dict)]
        blocks = [b for c in costs if isinstance(c.get("blocks"), list) for b in c["blocks"] if isinstance(b, dict)]
        if op == "top":
            data[draw(st.sampled_from(["device_name", "h2d_bytes_per_s", "models"]))] = draw(json_values)
        elif op == "delete_top":
            data.pop(draw(st.sampled_from(["device_name", "h2d_bytes_per_s", "models"])), None)
        elif op == "number":
            targets = [(data, "h2d_bytes_per_s")]
            targets += [(c, k) for c in costs for k in ("other_bytes", "other_compute_s", "activation_bytes")]
            targets += [(b, k) for b in blocks for k in ("bytes", "compute_s")]
            owner, key = draw(st.sampled_from(targets))
            owner[key] = _mutant_value(draw, NUMBER_MUTANTS)
        elif op == "model_replace" and models:
            models[draw(st.sampled_from(sorted(models)))] = draw(json_values)
        elif op == "blocks_replace" and costs:
            draw(st.sampled_from(costs))["blocks"] = draw(st.one_of(st.just([]), json_values))
        elif op == "block_replace" and costs:
            cost = draw(st.sampled_from(costs))
            if isinstance(cost.get("blocks"), list) and cost["blocks"]:
                cost["blocks"][draw(st.integers(0, len(cost["blocks"]) - 1))] = draw(json_values)
        elif op == "block_field" and blocks:
            draw(st.sampled_from(blocks))["path"] = draw(json_values)
        elif op == "splits" and blocks:
            draw(st.sampled_from(blocks))["splits"] = draw(st.one_of(st.sampled_from(SPLIT_MUTANTS), json_values))
        elif op == "delete_field" and (costs or blocks):
            owner = draw(st.sampled_from(costs + blocks))
            if owner:
                del owner[draw(st.sampled_from(sorted(owner)))]
        elif op == "add_model":
            twin = copy.deepcopy(draw(st.sampled_from(costs))) if costs and draw(st.booleans()) else draw(json_values)
            models[draw(st.text(max_size=4))] = twin
            data["models"] = models
    return data


@fuzz(1200)
@given(st.one_of(mutated_profile_dicts(), mutated_profile_dicts(), mutated_profile_dicts(), json_values, python_values))
def test_device_profile_from_dict_accepts_exactly_the_valid_profiles(data):
    _check_profile_dict(data)


@fuzz(400)
@given(profiles)
def test_valid_device_profiles_round_trip(profile):
    assert DeviceProfile.from_dict(profile.to_dict()) == profile
    assert DeviceProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


# --------------------------------------------------------------------------------------------------
# 3. The planner

bandwidths = st.one_of(
    st.integers(6, 26).map(lambda k: 10 ** (k / 2)),  # 1e3 .. 1e13 bytes/s, log-spaced
    st.floats(min_value=1e3, max_value=1e13, allow_nan=False),
)
block_bytes = st.one_of(st.integers(1, 10**9), st.sampled_from([1, 1000, 10**6, 10**9]))
block_compute = st.one_of(st.floats(0.0, 0.1), st.sampled_from([0.0, 1e-3, 0.1]))


@st.composite
def planner_cases(draw):
    n = draw(st.integers(1, 30))
    uniform = draw(st.booleans())
    first = (draw(block_bytes), draw(block_compute))
    blocks = []
    for i in range(n):
        nbytes, compute = first if uniform and draw(st.integers(0, 3)) else (draw(block_bytes), draw(block_compute))
        splits = sorted(set(draw(st.lists(st.integers(1, nbytes - 1), max_size=4)))) if nbytes > 1 else []
        blocks.append(BlockCost(f"blocks.{i}", nbytes, compute, tuple(splits)))
    blocks = tuple(blocks)
    cost = ModelCost(
        blocks,
        draw(st.one_of(st.just(0), st.integers(0, 10**9))),
        draw(st.one_of(st.just(0.0), st.floats(0.0, 0.1))),
        draw(st.one_of(st.just(0), st.integers(0, 10**9))),
    )
    low, high = minimum_memory(cost), plan_memory(cost, frozenset(), 1)
    budget = st.one_of(
        st.integers(0, low),
        st.integers(low, high),
        st.integers(low, high),
        st.integers(low, high),
        st.integers(high, 2 * high),
        st.sampled_from([0, max(low - 1, 0), low, low + 1, high - 1, high, high + 1]),
    )
    return cost, draw(bandwidths), draw(st.lists(budget, min_size=1, max_size=3))


def _check_plan(cost: ModelCost, budget: int, bandwidth: float):
    """The plan for ``budget`` (checked), or None when the budget is below the minimum (checked too)."""
    low = minimum_memory(cost)
    try:
        plan = plan_blocks(cost, budget, bandwidth)
    except BudgetTooSmall as err:
        assert isinstance(err, ValueError)
        assert budget < low, f"budget {budget} >= minimum {low} was refused"
        assert (err.budget, err.minimum) == (budget, low)
        event("BudgetTooSmall")
        return None
    assert budget >= low, f"budget {budget} < minimum {low} was accepted"
    n = len(cost.blocks)
    assert plan.budget == budget and plan.cost is cost
    assert plan.streamed <= frozenset(range(n))
    assert plan.window in WINDOWS and (plan.all_resident or plan.window <= n)
    assert set(plan.kept) <= plan.streamed and all(size in cost.blocks[i].splits for i, size in plan.kept.items())
    assert plan.memory == plan_memory(cost, plan.streamed, plan.window, plan.kept) <= budget
    assert math.isfinite(plan.step_s) and plan.step_s >= 0
    floor = floor_s(cost, plan.streamed, bandwidth, plan.kept)
    assert plan.step_s >= floor * (1 - 1e-9) - 1e-12, (plan.step_s, floor, sorted(plan.streamed), plan.window)
    if plan_memory(cost, frozenset(), 1) <= budget:
        assert plan.all_resident
    assert math.isclose(plan.step_s, simulate(cost, plan.streamed, plan.window, bandwidth, kept=plan.kept).step_s, rel_tol=1e-12)
    assert isinstance(plan.explain(), str)
    event("all resident" if plan.all_resident else "all streamed" if len(plan.streamed) == n else "mixed")
    if plan.kept:
        event("split")
    return plan


@fuzz(300)
@given(planner_cases())
def test_planner_plans_fit_the_budget_beat_no_floor_and_more_budget_is_never_slower(case):
    cost, bandwidth, budgets = case
    plans = {budget: _check_plan(cost, budget, bandwidth) for budget in budgets}
    steps = [(budget, plans[budget].step_s) for budget in sorted(plans) if plans[budget] is not None]
    for (b1, s1), (b2, s2) in zip(steps, steps[1:]):
        assert s2 <= s1 + 1e-9, f"budget {b2} predicts {s2} s, slower than {s1} s at the smaller budget {b1}"


# --------------------------------------------------------------------------------------------------
# 4. parse_size

_UNITS = ["", "B", "KB", "MB", "GB", "TB", "KIB", "MIB", "GIB", "TIB", "Kb", "Mb", "Gb"]


def _expected_size(value: object) -> "int | None":
    """The size ``parse_size`` must return, or None where it must raise ValueError (the documented contract: a
    number of bytes, or accelerate's ``convert_file_size_to_int`` reading of a string; between one byte and
    ``MAX_SIZE``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str):
        try:
            number = convert_file_size_to_int(value)
        except (ValueError, OverflowError):
            return None
    else:
        return None
    if not 1 <= number <= MAX_SIZE:
        return None
    return int(number)


@st.composite
def size_texts(draw) -> str:
    space = st.sampled_from(["", " ", "  ", "\t", "\n", "\u00a0", "\u2003"])
    digits = st.one_of(
        st.from_regex(r"[0-9]{1,6}", fullmatch=True),
        st.from_regex(r"[0-9]{0,3}\.[0-9]{1,4}", fullmatch=True),
        st.integers(300, 500).map(lambda k: "9" * k),
        st.sampled_from(["0", "0.0", ".5", "5.", "1e3", "-1", "+1", "١٢"]),
    )
    unit = st.one_of(
        st.sampled_from(_UNITS + ["gib", "Gb", "kIb", "K", "iB", "GiBs", "bytes", "G B"]),
        st.from_regex(r"[A-Za-z]{0,4}", fullmatch=True),
    )
    return draw(space) + draw(digits) + draw(space) + draw(unit) + draw(space)


@fuzz(2000)
@given(st.one_of(size_texts(), st.text(max_size=12), st.integers(), st.floats(), st.sampled_from(SPECIAL_SCALARS), python_values))
def test_parse_size_returns_a_positive_int_or_raises_value_error(value):
    expected = _expected_size(value)
    kind, result = _outcome(parse_size, value, "budget")
    if kind == "error":
        if not isinstance(result, ValueError):
            raise AssertionError(f"parse_size({value!r}) raised an undocumented {type(result).__name__}: {result!r}") from result
        assert expected is None, f"parse_size({value!r}) refused a valid size ({expected} bytes): {result}"
        event("ValueError")
        return
    assert type(result) is int and result > 0, f"parse_size({value!r}) returned {result!r}"
    assert result == expected, f"parse_size({value!r}) = {result}, expected {expected}"
    event("size")


# --------------------------------------------------------------------------------------------------
# 5. dispatch_pipeline with an edited device map


@contextmanager
def _one_torch_thread():
    """Run torch single-threaded: on a busy 2-core CI box, OpenMP's thread hand-offs make the tiny
    pipeline's ops 100x slower (each waits for a descheduled worker). Same setting for the reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@lru_cache(maxsize=1)
def _tiny():
    """One tiny pipeline shared by every example (each dispatch is undone), its reference output and map."""
    pipe = make_tiny_pipeline()
    with _one_torch_thread():
        reference = pipe("x", steps=2)
    weights = {k: v.clone() for k, v in pipe.state_dict().items()}
    identities = {k: id(p) for k, p in pipe.named_parameters()}
    base = compile_device_map(pipe, "layerwise", "cpu").to_dict()
    modules = [name for name, _ in pipe.named_modules()]
    return pipe, reference, weights, identities, base, modules


def _assert_pipeline_pristine(pipe, reference, weights, identities) -> None:
    state = pipe.state_dict()
    assert state.keys() == weights.keys()
    for key, value in state.items():
        assert value.device == weights[key].device and value.dtype == weights[key].dtype, key
        assert torch.equal(value, weights[key]), f"{key} changed"
    assert {k: id(p) for k, p in pipe.named_parameters()} == identities, "a parameter object was replaced"
    assert not any(hasattr(m, "_hf_hook") for m in pipe.modules()), "a hook was left behind"
    assert not hasattr(pipe, "_offload_map_handle")
    assert torch.equal(pipe("x", steps=2), reference)


DISPATCH_MUTATIONS = [
    "drop",
    "placement",
    "placement",
    "add_real",
    "add_real",
    "add_real",
    "add_fake",
    "clear_bytes",
    "clear_bytes",
    "window",
    "role",
    "shuffle",
    "drop_component",
    "add_component",
]


@st.composite
def edited_maps(draw) -> dict:
    _, _, _, _, base, modules = _tiny()
    data = copy.deepcopy(base)
    entries = data["entries"]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(DISPATCH_MUTATIONS))
        note(f"mutation {op}")
        placement = draw(st.sampled_from(PLACEMENT_VALUES))
        if op == "drop" and entries:
            entries.pop(draw(st.integers(0, len(entries) - 1)))
        elif op == "placement" and entries:
            draw(st.sampled_from(entries))["placement"] = placement
        elif op in ("add_real", "add_fake"):
            real = draw(st.sampled_from(modules))
            path = (
                real
                if op == "add_real"
                else draw(
                    st.one_of(
                        st.sampled_from(
                            [
                                f"{real}.",
                                f".{real}",
                                f"{real}..",
                                real.replace(".", "..", 1),
                                f"{real}.nope",
                                f"{real}.0",
                                "transformer.double_blocks.7",
                                "transformer.proj_in.weight",
                                "transformer.single_blocks.0.scale",
                                "transformer.double_blocks",
                                "transformer.single_blocks",
                                "text_encoder.layers",
                                "",
                            ]
                        ),
                        st.text(max_size=10),
                    )
                )
            )
            existing = [e for e in entries if e["path"] == path]
            if existing:
                existing[0]["placement"] = placement
            else:
                entries.insert(
                    draw(st.integers(0, len(entries))), {"path": path, "placement": placement, "bytes": 0, "dtype": ""}
                )
        elif op == "clear_bytes":
            for entry in entries:
                entry["bytes"] = 0
        elif op == "window":
            data["window"] = draw(st.integers(1, 6))
        elif op == "role":
            data["components"][draw(st.sampled_from(sorted(data["components"])))] = draw(st.sampled_from(ROLE_VALUES))
        elif op == "shuffle":
            entries[:] = draw(st.permutations(entries))
        elif op == "drop_component" and data["components"]:
            data["components"].pop(draw(st.sampled_from(sorted(data["components"]))))
        elif op == "add_component":
            data["components"][draw(st.sampled_from(["unet", "vae.decoder", "transformer.proj_in", ""]))] = draw(
                st.sampled_from(ROLE_VALUES)
            )
    return data


@fuzz(400)
@given(edited_maps())
def test_dispatch_with_an_edited_map_is_bit_exact_or_a_clean_value_error(data):
    with _one_torch_thread():
        _check_dispatch(data)


def _check_dispatch(data: dict) -> None:
    pipe, reference, weights, identities, _, modules = _tiny()
    kind, dmap = _outcome(DeviceMap.from_dict, data)  # a malformed path is refused here, before any dispatch
    if kind == "error":
        assert isinstance(dmap, ValueError) and _map_problem(data), f"a well-formed edited map was refused: {dmap}"
        event("refused when loaded")
        return
    kind, result = _outcome(dispatch_pipeline, pipe, device_map=dmap)
    if kind == "error":
        if not isinstance(result, ValueError):
            raise AssertionError(f"dispatch_pipeline raised an undocumented {type(result).__name__}: {result!r}") from result
        else:
            event("rejected (ValueError)")
        _assert_pipeline_pristine(pipe, reference, weights, identities)
        return
    handle = result
    try:
        event("dispatched")
        real = set(modules) - {""}
        for path in dmap.entries:
            assert path in real, f"entry {path!r} names no module of the pipeline, yet it was accepted"
        assert pipe._offload_map_handle is handle
        assert {p: e.placement for p, e in handle.device_map.entries.items()} == {p: e.placement for p, e in dmap.entries.items()}
        out = pipe("x", steps=2)
        assert out.dtype == reference.dtype and torch.equal(out, reference), "the dispatched output differs"
    finally:
        handle.remove()
    _assert_pipeline_pristine(pipe, reference, weights, identities)


# --------------------------------------------------------------------------------------------------
# Regressions: the minimal reproductions of the bugs the fuzzers found, now fixed.

VALID_MAP = {
    "version": 1,
    "device": "cpu",
    "window": 2,
    "components": {"t": "dit"},
    "entries": [{"path": "t", "placement": "gpu", "bytes": 0, "dtype": ""}],
}


def _raises_value_error(fn, *args, **kwargs) -> bool:
    """True if ``fn(*args, **kwargs)`` raises ValueError, False if it returns; any other exception propagates."""
    try:
        fn(*args, **kwargs)
    except ValueError:
        return True
    return False


def test_regression_device_map_unhashable_role_escapes_as_type_error():
    assert _raises_value_error(DeviceMap.from_dict, {**VALID_MAP, "components": {"t": []}})


def test_regression_device_map_json_role_object_escapes_as_type_error():
    assert _raises_value_error(
        DeviceMap.from_json, '{"version": 1, "device": "cpu", "window": 2, "components": {"t": {}}, "entries": []}'
    )


@pytest.mark.parametrize("version", [True, 1.0])
def test_regression_device_map_accepts_a_non_int_version(version):
    assert _raises_value_error(DeviceMap.from_dict, {**VALID_MAP, "version": version})


def test_regression_device_map_deeply_nested_json_escapes_as_recursion_error():
    assert _raises_value_error(DeviceMap.from_json, "[" * 100_000)


def test_regression_device_profile_load_of_deeply_nested_json_escapes_as_recursion_error(tmp_path):
    (tmp_path / "profile.json").write_text("[" * 100_000)
    assert _raises_value_error(DeviceProfile.load, tmp_path / "profile.json")


@pytest.mark.parametrize("field", ["h2d_bytes_per_s", "block bytes"])
def test_regression_device_profile_huge_int_escapes_as_overflow_error(field):
    data = BASE_PROFILE.to_dict()
    if field == "h2d_bytes_per_s":
        data["h2d_bytes_per_s"] = 10**400
    else:
        data["models"]["m"]["blocks"][0]["bytes"] = 10**400
    assert _raises_value_error(DeviceProfile.from_dict, data)


def test_regression_device_profile_big_int_bytes_do_not_round_trip():
    profile = DeviceProfile("x", 1e9, {"m": ModelCost((BlockCost("b.0", 2**53 + 1, 1e-3),), 0, 0.0, 0)})
    assert DeviceProfile.from_dict(profile.to_dict()) == profile


def test_regression_planner_step_is_nan_when_copies_take_infinite_time():
    # 1e-300 bytes/s passes DeviceProfile.from_dict (finite, positive); 1e9 / 1e-300 overflows to inf.
    cost = ModelCost((BlockCost("b.0", 10**9, 1e-3), BlockCost("b.1", 10**9, 1e-3)))
    kind, plan = _outcome(plan_blocks, cost, minimum_memory(cost), 1e-300)
    assert isinstance(plan, ValueError) if kind == "error" else not math.isnan(plan.step_s)


def test_regression_parse_size_of_a_fraction_returns_zero():
    assert _raises_value_error(parse_size, 0.5)


@pytest.mark.parametrize("value", [float("inf"), "9" * 400, "1" * 300 + "TB"])
def test_regression_parse_size_overflow_escapes_as_overflow_error(value):
    assert _raises_value_error(parse_size, value)


@pytest.mark.parametrize("path", ["", "foo.bar"])
def test_regression_dispatch_entry_outside_every_component_escapes_as_key_error(path):
    pipe = make_tiny_pipeline()
    dmap = compile_device_map(pipe, "layerwise", "cpu")
    dmap[path] = "gpu"
    assert _raises_value_error(dispatch_pipeline, pipe, device_map=dmap)


@pytest.mark.parametrize("path", ["transformer.", "transformer..proj_in", "transformer..double_blocks.0"])
def test_regression_a_path_with_an_empty_segment_is_refused_when_it_is_written(path):
    dmap = compile_device_map(make_tiny_pipeline(), "layerwise", "cpu")
    assert _raises_value_error(dmap.__setitem__, path, "gpu")
    assert path not in dmap
