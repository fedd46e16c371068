"""JSON from uploads, parsed with caps: size, nesting depth, duplicate keys, huge numbers.

Every JSON file that comes from a tenant's upload (config.json, tokenizer files, safetensors
headers, indexes) goes through `load_json_capped`, so a hostile file costs at most `max_bytes`
of reading and ends in InvalidModel naming the file, never in RecursionError, ValueError
("Exceeds the limit (4300 digits)") or UnicodeDecodeError text from the standard library.

Depth is measured on the raw bytes before parsing (strings blanked out first), so the C parser
never recurses deeper than `max_depth`, whatever the interpreter's recursion limit is.
Stdlib only: the API imports this module.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import InvalidModel

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_DEPTH = 64

# A string literal (skipped whole: brackets inside it are not nesting) or one bracket.
# (The string's loop unrolled, "[^"\\]*(?:\\.[^"\\]*)*": same matches, fewer steps than (a|b)*.)
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")


def _fail(name: str, what: str) -> InvalidModel:
    return InvalidModel(f"{name} {what}", details={"file": name})


def _read(source: bytes | bytearray | str | os.PathLike, name: str, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        path = Path(source)
        try:
            if path.stat().st_size > max_bytes:
                raise _fail(name, f"is larger than {max_bytes} bytes")
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError:
            raise _fail(name, "cannot be read") from None
    if len(data) > max_bytes:
        raise _fail(name, f"is larger than {max_bytes} bytes")
    return data


def json_depth(data: bytes) -> int:
    """Deepest nesting of arrays/objects in `data` (JSON text), without parsing it and in
    constant memory."""
    return _depth(data, None)


def nests_deeper_than(data: bytes, limit: int) -> bool:
    if data.count(b"[") + data.count(b"{") <= limit:  # cannot nest deeper than it opens
        return False
    return _depth(data, limit) > limit


def _depth(data: bytes, stop_above: int | None) -> int:
    depth = deepest = 0
    for m in _TOKEN.finditer(data):
        c = data[m.start()]
        if c == 0x22:  # '"': a string
            continue
        if c in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_above is not None and deepest > stop_above:
                    break
        else:
            depth -= 1
    return deepest


def _no_duplicates(name: str):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            for dup, _ in pairs:  # the first key met a second time
                if dup in seen:
                    break
                seen.add(dup)
            raise _fail(name, f"has the key {dup[:80]!r} more than once")
        return obj

    return hook


def load_json_capped(source: bytes | bytearray | str | os.PathLike, *, name: str,
                     max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH,
                     reject_duplicates: bool = True) -> object:
    """Parse JSON from a path or bytes. `name` is what messages call the file (never a server
    path). Raises InvalidModel (details {"file": name}) for anything that is not sane JSON."""
    data = _read(source, name, max_bytes)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _fail(name, f"is not UTF-8 text (bad byte at offset {e.start})") from None
    if nests_deeper_than(data, max_depth):
        raise _fail(name, f"nests arrays/objects more than {max_depth} deep")
    hook = _no_duplicates(name) if reject_duplicates else None
    try:
        return json.loads(text, object_pairs_hook=hook)
    except json.JSONDecodeError as e:
        raise _fail(name, f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:  # only reachable if max_depth is set above the interpreter's limit
        raise _fail(name, "nests arrays/objects too deep") from None
    except ValueError:  # e.g. an integer literal longer than int_max_str_digits
        raise _fail(name, "holds a number too long to parse") from None


def load_json_object(source: bytes | bytearray | str | os.PathLike, *, name: str,
                     max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH,
                     reject_duplicates: bool = True) -> dict:
    """load_json_capped for files that must hold one JSON object (config.json, indexes)."""
    obj = load_json_capped(source, name=name, max_bytes=max_bytes, max_depth=max_depth,
                           reject_duplicates=reject_duplicates)
    if not isinstance(obj, dict):
        raise _fail(name, "is not a JSON object")
    return obj


__all__ = ["load_json_capped", "load_json_object", "json_depth", "nests_deeper_than", "DEFAULT_MAX_BYTES",
           "DEFAULT_MAX_DEPTH"]
