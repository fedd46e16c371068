"""Recipe identity: what was asked of which input by which engine, hashed canonically.

The same source bytes, target spec and engine version always give the same recipe hash, so
identical requests can be recognised (and, later, answered with existing artifacts).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def make_recipe(*, source_sha256: str, target: Mapping[str, Any], engine_version: str) -> dict:
    return {
        "input_sha256": source_sha256,
        "converter": target["format"],
        "target": dict(target),
        "engine_version": engine_version,
    }


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(recipe).encode()).hexdigest()
