"""The one JSON reader for text that comes from files: bounded nesting, bounded number literals, no
duplicate keys, no NaN/Infinity. Python's ``json`` would otherwise raise ``RecursionError`` on deeply
nested brackets, spend quadratic time on (or refuse with a bare ``ValueError``) a 5,000-digit number,
and keep the last of two equal keys silently."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import FileFormatError
from .fileutil import StrPath

MAX_JSON_DEPTH = 32  # microcnn's own files nest at most 5 levels
MAX_NUMBER_CHARS = 40  # float32/float64 reprs and 64-bit integers need at most 25


class _Refused(ValueError):
    pass


_STEP = np.zeros(256, np.int32)
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1
_CHUNK = 1 << 20


def _depth(data: bytes) -> int:
    """Deepest bracket nesting outside strings, in one linear pass over the bytes (NumPy, 1 MB at a
    time; a regex skipping strings would restart at every escaped quote of an unterminated string).
    A quote is escaped when an odd run of backslashes precedes it; unescaped quotes toggle 'inside a
    string'. Runs and string state carry across chunks."""
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than the limit
    all_bytes = np.frombuffer(data, np.uint8)
    deepest = level = inside = run = 0  # run: backslashes just before the current chunk
    for start in range(0, len(all_bytes), _CHUNK):
        b = all_bytes[start:start + _CHUNK]
        index = np.arange(len(b), dtype=np.int32)
        backslash = b == ord("\\")
        last_other = np.maximum.accumulate(np.where(backslash, -1, index))
        runs = index - last_other + np.where(last_other < 0, run, 0)  # backslashes ending here
        before = np.concatenate(([run], runs[:-1]))
        quotes = (b == ord('"')) & (before % 2 == 0)
        in_string = (inside + np.cumsum(quotes)) % 2 == 1
        depth = level + np.cumsum(np.where(in_string, 0, _STEP[b]))
        deepest = max(deepest, int(depth.max()))
        level, inside, run = int(depth[-1]), int(in_string[-1]), int(runs[-1])
    return deepest


def _number(text: str, convert: Callable[[str], Any]) -> Any:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Refused(f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    value = convert(text)
    if isinstance(value, float) and not np.isfinite(value):
        raise _Refused(f"number {text} overflows float64")
    return value


def _constant(name: str) -> None:
    raise _Refused(f"{name} is not JSON")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"duplicate key {key!r}")
            seen.add(key)
    return obj


def load_json_bounded(text: str | bytes, source: StrPath, what: str = "JSON") -> Any:
    """Parse ``text`` (from file ``source``, described as ``what``) or raise ``FileFormatError``
    naming both. Refused: invalid JSON or UTF-8, nesting deeper than ``MAX_JSON_DEPTH``, number literals
    longer than ``MAX_NUMBER_CHARS``, numbers overflowing float64, NaN/Infinity, duplicate keys.

    Example::

        >>> load_json_bounded('{"bits": 8}', "model.json")
        {'bits': 8}
        >>> load_json_bounded('{"bits": 8, "bits": 4}', "model.json", "header")
        Traceback (most recent call last):
        ...
        microcnn.errors.FileFormatError: model.json: header refused: duplicate key 'bits'
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    depth = _depth(data)
    if depth > MAX_JSON_DEPTH:
        raise FileFormatError(source, f"{what} is nested too deeply", f"at most {MAX_JSON_DEPTH} levels",
                              f"{depth} levels")
    try:
        return json.loads(data, parse_int=lambda s: _number(s, int), parse_float=lambda s: _number(s, float),
                          parse_constant=_constant, object_pairs_hook=_object)
    except _Refused as exc:
        raise FileFormatError(source, f"{what} refused: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8
        raise FileFormatError(source, f"{what} is not valid JSON ({type(exc).__name__}: "
                              f"{str(exc)[:100]})") from None
