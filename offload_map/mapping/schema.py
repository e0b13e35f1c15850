"""Reading untrusted JSON (device maps, device profiles, checkpoint indexes): parse, then check each field.

Every failure is a ``ValueError`` that names the document and the field; nothing is executed or unpickled.
"""

from __future__ import annotations

import json
import math

# An exabyte: any larger byte count in a document is corrupt (and would overflow the planner's arithmetic).
MAX_SIZE = 2**60


def parse_json(text: str, what: str):
    """``json.loads`` whose every failure, nesting too deep included, is a ValueError naming ``what``.

    Example:
        >>> parse_json("{", "device map")
        Traceback (most recent call last):
        ...
        ValueError: device map is not valid JSON: JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)
    """
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{what} is not valid JSON: {type(err).__name__}: {str(err)[:200]}") from None


def typed(data: dict, key: str, kind: type, where: str):
    """``data[key]`` if it is a ``kind`` (never a bool standing in for an int), else a ValueError.

    Example:
        >>> typed({"window": "2"}, "window", int, "device map")
        Traceback (most recent call last):
        ...
        ValueError: device map: 'window' must be a int, got '2'
    """
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: {key!r} must be a {kind.__name__}, got {value!r:.80}")
    return value


def number(data: dict, key: str, where: str) -> float:
    """``data[key]`` as a finite non-negative float, else a ValueError."""
    value = data.get(key)
    try:
        result = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int beyond float range
        result = math.inf
    if not math.isfinite(result) or result < 0:
        raise ValueError(f"{where}: {key!r} must be a finite non-negative number, got {value!r:.40}")
    return result


def count(data: dict, key: str, where: str, default: int | None = None) -> int:
    """``data[key]`` as an int between 0 and ``MAX_SIZE`` (``default`` when absent, if given), else a ValueError."""
    value = data.get(key, default)
    if type(value) is not int or not 0 <= value <= MAX_SIZE:
        raise ValueError(f"{where}: {key!r} must be an int between 0 and {MAX_SIZE}, got {value!r:.40}")
    return value
