"""Target specifications: what one artifact should be (pure Python, used by the API).

A target is written "gguf:Q8_0" or {"format": "gguf", "quantization": "Q8_0", "params": {}}.
Input is case-insensitive; the parsed spec carries the canonical spelling from the manifest so
that keys and recipe hashes are stable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import UnsupportedTarget
from .gates import target_gates
from .gguf.auto_budget import AUTO, parse_auto_budget
from .gguf.tensor_types import parse_tensor_types
from .manifest import MANIFEST


def _frozen(params: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(params or {}))


@dataclass(frozen=True)
class TargetSpec:
    format: str
    quantization: str
    params: Mapping[str, Any] = field(default_factory=lambda: _frozen(None))

    def __post_init__(self) -> None:
        # Freeze whatever mapping we were given so a spec can't change after hashing.
        if not isinstance(self.params, MappingProxyType):
            object.__setattr__(self, "params", _frozen(self.params))

    def __hash__(self) -> int:
        # params may hold unhashable values (lists, dicts): hash their canonical JSON instead.
        return hash((self.format, self.quantization, json.dumps(dict(self.params), sort_keys=True, default=str)))

    @property
    def key(self) -> str:
        return f"{self.format}:{self.quantization}"

    def to_dict(self) -> dict:
        return {"format": self.format, "quantization": self.quantization, "params": dict(self.params)}


def _canonical_format(value: str) -> str:
    fmt = value.strip().lower()
    if fmt not in MANIFEST["formats"]:
        valid = ", ".join(sorted(MANIFEST["formats"]))
        raise UnsupportedTarget(f"unknown format {value!r}; valid formats: {valid}")
    return fmt


def _canonical_quantization(fmt: str, value: str) -> str:
    offered = MANIFEST["formats"][fmt]["quantizations"]
    if fmt == "gguf" and value.strip().lower() == AUTO:
        return AUTO  # the automatic choice (engine/gguf/auto_budget.py), not a file type
    by_lower = {q.lower(): q for q in offered}
    quant = by_lower.get(value.strip().lower())
    if quant is None:
        raise UnsupportedTarget(
            f"format {fmt!r} has no quantization {value!r}; valid quantizations: {', '.join(offered)}"
        )
    return quant


_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# a shard must hold at least one tensor plus the metadata; smaller limits are typos
MIN_SPLIT_BYTES = 1 << 20


def parse_size(text: str | int, *, what: str = "split size", minimum: int = MIN_SPLIT_BYTES) -> int:
    """'2G', '500M', 4096 → bytes (binary units, as llama.cpp's gguf-split reads them);
    UnsupportedTarget (naming `what`) when it is not such a size."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise UnsupportedTarget(f"{text!r} is not a size like 2G or 500M")
    raw = str(text).strip().upper().removesuffix("B")
    try:
        size = int(float(raw[:-1]) * _SIZE_UNITS[raw[-1]]) if raw and raw[-1] in _SIZE_UNITS else int(raw)
    except ValueError:
        raise UnsupportedTarget(f"{text!r} is not a size like 2G or 500M") from None
    if size < minimum:
        raise UnsupportedTarget(f"{what} {text!r} is below the minimum of {minimum} bytes")
    return size


def split_max_bytes(target: TargetSpec) -> int | None:
    """A GGUF target's params.split_max_size in bytes (output written as llama.cpp split
    shards), or None for one file."""
    value = target.params.get("split_max_size")
    return None if value is None else parse_size(value)


def parse_target(value: str | Mapping[str, Any] | TargetSpec) -> TargetSpec:
    """Parse "fmt:QUANT" or a mapping into a canonical TargetSpec; UnsupportedTarget if invalid."""
    if isinstance(value, TargetSpec):
        value = value.to_dict()
    if isinstance(value, str):
        fmt, sep, quant = value.partition(":")
        if not sep or not fmt.strip() or not quant.strip():
            raise UnsupportedTarget(f"target {value!r} is not of the form 'format:QUANTIZATION' (e.g. 'gguf:Q8_0')")
        params: Mapping[str, Any] = {}
    elif isinstance(value, Mapping):
        raw_fmt, raw_quant = value.get("format"), value.get("quantization")
        params = value.get("params") or {}
        if not isinstance(raw_fmt, str) or not isinstance(raw_quant, str):
            raise UnsupportedTarget("a target needs string fields 'format' and 'quantization'")
        fmt, quant = raw_fmt, raw_quant
        if not isinstance(params, Mapping):
            raise UnsupportedTarget("a target's 'params' must be an object")
    else:
        raise UnsupportedTarget(f"a target must be a string or an object, not {type(value).__name__}")
    canonical_fmt = _canonical_format(fmt)
    spec = TargetSpec(canonical_fmt, _canonical_quantization(canonical_fmt, quant), _frozen(params))
    if canonical_fmt == "gguf":
        split_max_bytes(spec)  # a bad split size is refused with the target, not in the worker
        if spec.quantization == AUTO:
            parse_auto_budget(spec.params, parse_size)
            if "tensor_types" in spec.params:
                raise UnsupportedTarget("gguf:auto chooses params.tensor_types itself; give a preset to set them")
        else:
            parse_tensor_types(spec.params.get("tensor_types"))
    target_gates(spec.params, fmt=canonical_fmt)  # so is a bad quality gate (engine/gates.py)
    return spec


__all__ = ["TargetSpec", "parse_size", "parse_target", "split_max_bytes"]
