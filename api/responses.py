"""JSON that every client can parse: NaN and ±Infinity become null.

Python's json writes NaN/Infinity as bare tokens (invalid JSON) or, with ``allow_nan=False`` as
Starlette does, raises "Out of range float values are not JSON compliant" — a 500 for a whole
listing because one artifact's metrics hold a NaN. Every response of the API is rendered by
:class:`JSONResponse` (the app's default response class, and the one the error handlers use).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse as _StarletteJSONResponse

from quantyard.catalog.artifacts import json_safe

# One walk for both: the catalog stores metrics through it, responses are rendered through it.
finite = json_safe


def dumps(value: Any, **kwargs) -> str:
    """json.dumps that never writes NaN/Infinity (the common case pays one plain dumps)."""
    kwargs.setdefault("ensure_ascii", False)
    try:
        return json.dumps(value, allow_nan=False, **kwargs)
    except ValueError:  # a non-finite float somewhere: only then walk the value
        return json.dumps(finite(value), allow_nan=False, **kwargs)


class JSONResponse(_StarletteJSONResponse):
    """Starlette's JSONResponse, with non-finite floats written as null."""

    def render(self, content: Any) -> bytes:
        return dumps(content, separators=(",", ":")).encode("utf-8")


__all__ = ["JSONResponse", "dumps", "finite"]
