"""Per-tensor type overrides: llama-quantize's `--tensor-type PATTERN=TYPE` (stdlib only).

A GGUF target's `params.tensor_types` is an object {pattern: type}, applied in the order given,
the first pattern that matches a tensor's name winning, exactly as llama.cpp does
(src/llama-quant.cpp llama_tensor_get_type): the pattern is a regex *searched* in the tensor
name (std::regex_search), lowercased first (tools/quantize parse_tensor_type); a tensor it
matches takes that type instead of the mixture's rule (and, as in llama.cpp, does not advance
the mixture's layer counters); the row fallback (Q6_K -> Q8_0 for odd rows, ...) still applies;
never-quantized tensors (norms, 1-D) are never touched.

Patterns come from tenants, so they are capped and restricted to a regex subset whose meaning is
the same in Python's `re` and C++'s ECMAScript std::regex and that cannot backtrack badly: names,
`.`, `\\.`, `\\d`, `|`, groups without a quantifier after them, classes, `*+?`, anchors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ..errors import UnsupportedTarget
from .ggml_types import GGML_TYPES

MAX_OVERRIDES = 64
MAX_PATTERN_CHARS = 128
# quantifiers per pattern: k of them can backtrack O(len(name)^k) on a ~60-character name
MAX_QUANTIFIERS = 4
# types an override may name: what ggml_quants writes and llama.cpp loads everywhere
OVERRIDE_TYPES = tuple(GGML_TYPES)
_ALLOWED = re.compile(r"^[a-z0-9_.\\|()\[\]*+?^$-]+$")
_NESTED_QUANTIFIER = re.compile(r"\)[*+?{]")
_BAD_ESCAPE = re.compile(r"\\[^.d]")

Overrides = tuple[tuple[str, str], ...]


def _pattern(raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise UnsupportedTarget(f"params.tensor_types: a pattern must be a non-empty string, not {raw!r}")
    if len(raw) > MAX_PATTERN_CHARS:
        raise UnsupportedTarget(f"params.tensor_types: pattern {raw[:40]!r}... is longer than "
                                f"{MAX_PATTERN_CHARS} characters")
    pat = raw.lower()  # llama-quantize lowercases the pattern
    if not _ALLOWED.match(pat) or _NESTED_QUANTIFIER.search(pat) or _BAD_ESCAPE.search(pat):
        raise UnsupportedTarget(
            f"params.tensor_types: pattern {raw!r} is outside the supported regex subset (letters, digits, "
            r"'_', '-', '.', '\.', '\d', '|', '()' without a quantifier after ')', '[]', '*', '+', '?', '^', '$')")
    if sum(pat.count(q) for q in "*+?") > MAX_QUANTIFIERS:
        raise UnsupportedTarget(f"params.tensor_types: pattern {raw!r} has more than {MAX_QUANTIFIERS} quantifiers")
    try:
        re.compile(pat)
    except re.error as e:
        raise UnsupportedTarget(f"params.tensor_types: pattern {raw!r} is not a valid regex: {e}") from None
    return pat


def _type(pattern: str, raw: object) -> str:
    by_lower = {t.lower(): t for t in OVERRIDE_TYPES}
    name = by_lower.get(raw.strip().lower()) if isinstance(raw, str) else None
    if name is None:
        raise UnsupportedTarget(f"params.tensor_types: {pattern!r} names type {raw!r}; valid ggml types: "
                                f"{', '.join(OVERRIDE_TYPES)}")
    return name


def parse_tensor_types(value: object) -> Overrides:
    """`params.tensor_types` ({pattern: type} or [[pattern, type], ...]) as ordered, canonical
    (lowercased pattern, ggml type name) pairs; UnsupportedTarget naming the bad entry."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        pairs: list = list(value.items())
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        pairs = list(value)
        if not all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in pairs):
            raise UnsupportedTarget("params.tensor_types: a list must hold [pattern, type] pairs")
    else:
        raise UnsupportedTarget("params.tensor_types must be an object {pattern: ggml type}")
    if len(pairs) > MAX_OVERRIDES:
        raise UnsupportedTarget(f"params.tensor_types has {len(pairs)} entries; at most {MAX_OVERRIDES}")
    out = []
    for raw_pat, raw_type in pairs:
        pat = _pattern(raw_pat)
        out.append((pat, _type(pat, raw_type)))
    return tuple(out)


def override_for(name: str, overrides: Overrides) -> str | None:
    """The first override type whose pattern is found in `name` (std::regex_search), or None."""
    for pat, type_name in overrides:
        if re.search(pat, name):
            return type_name
    return None


def cli_args(overrides: Overrides) -> list[str]:
    """The same overrides as llama-quantize arguments (for reproducing a file with llama.cpp)."""
    return [a for pat, t in overrides for a in ("--tensor-type", f"{pat}={t.lower()}")]


__all__ = ["parse_tensor_types", "override_for", "cli_args", "Overrides", "MAX_OVERRIDES", "OVERRIDE_TYPES"]
