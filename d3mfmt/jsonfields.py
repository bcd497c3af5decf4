"""Strict JSON for the manifest: one parse, then typed field access with the path in every error.

``loads`` refuses what two JSON readers could read differently or what cannot
be written back: NaN/Infinity literals, numbers outside the range of an IEEE
double (``1e999``, which some parsers turn into infinity, or an integer of 400
digits, which others cannot hold and Python cannot turn into a float), duplicate
keys, unpaired surrogates (``"\\ud800"``) and nesting deeper than ``MAX_DEPTH``. ``check_tree`` applies the same rules to a document
about to be written, so the writer never emits what the reader refuses.
"""

from __future__ import annotations

import json
import math
import re
import sys

from .errors import D3MFormatError

MAX_TEXT = 4096  # characters in a free-text field
MAX_DEPTH = 32  # nesting of objects and arrays, counting the top level
MAX_JSON_INT = int(sys.float_info.max)  # integers must fit an IEEE double: |n| <= 1.797...e308
MAX_INT_DIGITS = len(str(MAX_JSON_INT))  # 309: longer digit strings are refused before int() runs
_SURROGATE = re.compile("[\ud800-\udfff]")


def loads(raw: bytes, where: str = "manifest.json"):
    """UTF-8 JSON bytes -> a document without NaN, overflowing numbers or duplicate keys; raise D3MFormatError.

    Follow it with ``check_tree`` (``Manifest.from_dict`` does).
    """
    try:
        doc = json.loads(
            str(raw, "utf-8"),  # bytes or a memoryview
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_double_range_int,
            object_pairs_hook=_unique_keys,
        )
    except _Refused as exc:  # valid JSON that this format refuses: say what, not "invalid"
        raise D3MFormatError(f"{where}: {exc}"[:500]) from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError, TypeError) as exc:
        raise D3MFormatError(f"{where}: not valid UTF-8 JSON ({exc})"[:500]) from None
    return doc


def check_tree(doc, where: str = "manifest.json") -> None:
    """Raise D3MFormatError for an unpaired surrogate, a non-finite number or too deep nesting anywhere in ``doc``.

    Recursion is bounded by MAX_DEPTH, and a path string is built only for the
    error, so a manifest of millions of tiny values costs no per-value memory.
    """
    _walk(doc, [], where)


def _walk(node, path: list, where: str) -> None:
    if len(path) >= MAX_DEPTH:
        raise D3MFormatError(f"{where}: {_path(path)} nests deeper than {MAX_DEPTH} levels")
    if isinstance(node, str):
        if _SURROGATE.search(node):
            _check_text(node, _path(path), where)
    elif isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise D3MFormatError(f"{where}: {_path(path)} has a non-string key {show(key)}"[:500])
            path.append(key)
            if _SURROGATE.search(key):
                _check_text(key, _path(path), where)
            if not _plain(value):
                _walk(value, path, where)
            path.pop()
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            if not _plain(value):
                path.append(i)
                _walk(value, path, where)
                path.pop()
    elif isinstance(node, float):
        if not math.isfinite(node):
            raise D3MFormatError(f"{where}: {_path(path)} must be a finite number, got {node!r}")
    elif isinstance(node, int):  # bool is an int
        if not -MAX_JSON_INT <= node <= MAX_JSON_INT:
            raise D3MFormatError(f"{where}: {_path(path)} is an integer outside the range of an IEEE double "
                                 f"({_digits(node)} digits)")
    elif node is not None:
        raise D3MFormatError(f"{where}: {_path(path)} holds a {type(node).__name__}, which JSON cannot store")


def _plain(value) -> bool:
    """A value that needs no further look (the fast path for manifests of millions of numbers)."""
    kind = type(value)
    if kind is int:
        return -MAX_JSON_INT <= value <= MAX_JSON_INT
    if kind is float:
        return value - value == 0.0  # finite: inf - inf and nan - nan are nan
    return value is None or kind is bool


def _path(parts: list) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "top level"


def check_text(value: str, what: str) -> None:
    """Raise D3MFormatError if ``value`` cannot be written as UTF-8 (an unpaired surrogate)."""
    _check_text(value, what, "")


def _check_text(value: str, path: str, where: str) -> None:
    m = _SURROGATE.search(value)
    if m:
        prefix = f"{where}: " if where else ""
        raise D3MFormatError(
            f"{prefix}{path or 'a key'} contains the unpaired surrogate {m.group()!r}, which is not valid Unicode "
            f"(a file or folder name that is not UTF-8? rename it); got {value!r}"[:500]
        )


class _Refused(ValueError):
    """A number or key the format refuses in otherwise valid JSON."""


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:40]} is out of range (not a finite double)")
    return value


def _double_range_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    value = int(text) if digits <= MAX_INT_DIGITS else None  # int() of a 4,300-digit string alone takes time
    if value is None or not -MAX_JSON_INT <= value <= MAX_JSON_INT:
        raise _Refused(f"an integer of {digits} digits is out of range (not a finite double: at most "
                       f"{sys.float_info.max:.4g} in magnitude)")
    return value


def _digits(value: int) -> int:
    """Decimal digits of ``value`` without building its string (which Python refuses past 4,300 digits)."""
    return max(1, math.floor(abs(value).bit_length() * math.log10(2)) + 1)


def _unique_keys(pairs: list) -> dict:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"duplicate key {dup!r} (two readers could take different values)"[:300])
    return doc


def is_number(value) -> bool:
    """A JSON number this format accepts: an int (not a bool) or a finite float, within the double range."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -MAX_JSON_INT <= value <= MAX_JSON_INT
    return isinstance(value, float) and math.isfinite(value)


def canonical_float(value):
    """``value`` as the float a reload gives for a float field: ints (not bools) become floats.

    Anything else (None, a bool, a string, an int beyond the double range) is returned
    unchanged, for the field check to refuse with its own message.
    """
    if isinstance(value, int) and not isinstance(value, bool) and -MAX_JSON_INT <= value <= MAX_JSON_INT:
        return float(value)
    return value


def show(value, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters, also for integers too long for ``repr``."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_JSON_INT:
        return f"an integer of {_digits(value)} digits"
    text = repr(value) if not isinstance(value, (list, dict, tuple)) or len(value) < 1000 else f"<{type(value).__name__} of {len(value)}>"
    return text if len(text) <= limit else text[:limit] + "..."


class Fields:
    """Typed access to one JSON object, with the field path in every error."""

    def __init__(self, doc, where: str):
        if not isinstance(doc, dict):
            raise D3MFormatError(f"manifest.json: {where or 'top level'} must be an object, got {type(doc).__name__}")
        self.doc, self.where = doc, where

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _get(self, key: str, optional: bool):
        if key not in self.doc:
            if optional:
                return None
            raise D3MFormatError(f"manifest.json: missing required field {self._path(key)}")
        value = self.doc[key]
        if value is None and not optional:
            raise D3MFormatError(f"manifest.json: {self._path(key)} must not be null")
        return value

    def _fail(self, key: str, wanted: str, value) -> D3MFormatError:
        return D3MFormatError(f"manifest.json: {self._path(key)} must be {wanted}, got {show(value)}"[:500])

    def str(self, key: str, *, optional: bool = False, min_len: int = 1, max_len: int = MAX_TEXT):
        value = self._get(key, optional)
        if value is None:
            return None
        if not isinstance(value, str) or not min_len <= len(value) <= max_len:
            raise self._fail(key, f"a string of {min_len}..{max_len} characters", value)
        return value

    def choice(self, key: str, allowed: tuple[str, ...]):
        value = self._get(key, False)
        if value not in allowed:
            raise self._fail(key, f"one of {list(allowed)}", value)
        return value

    def int(self, key: str, lo: int, hi: int, *, optional: bool = False):
        value = self._get(key, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self._fail(key, f"an integer in {lo}..{hi}", value)
        return value

    def num(self, key: str, lo: float, hi: float, *, optional: bool = False):
        value = self._get(key, optional)
        if value is None:
            return None
        if not is_number(value) or not lo <= value <= hi:
            raise self._fail(key, f"a number in [{lo}, {hi}]", value)
        return float(value)

    def int_list(self, key: str, length: int, lo: int, hi: int) -> list[int]:
        value = self._get(key, False)
        ok = isinstance(value, list) and len(value) == length
        ok = ok and all(not isinstance(v, bool) and isinstance(v, int) and lo <= v <= hi for v in value)
        if not ok:
            raise self._fail(key, f"a list of {length} integers in {lo}..{hi}", value)
        return value

    def obj(self, key: str, *, optional: bool = False) -> "Fields | None":
        value = self._get(key, optional)
        return None if value is None else Fields(value, self._path(key))

    def raw_obj(self, key: str, *, optional: bool = False) -> dict | None:
        value = self._get(key, optional)
        if value is not None and not isinstance(value, dict):
            raise self._fail(key, "an object", value)
        return value

    def list_of_obj(self, key: str, lo: int, hi: int) -> list["Fields"]:
        value = self._get(key, False)
        if not isinstance(value, list) or not lo <= len(value) <= hi:
            raise self._fail(key, f"a list of {lo}..{hi} objects", type(value).__name__)
        return [Fields(v, f"{self._path(key)}[{i}]") for i, v in enumerate(value)]

    def items(self):
        return [(k, Fields(v, self._path(k))) for k, v in self.doc.items()]
