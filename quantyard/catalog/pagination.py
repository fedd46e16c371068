"""Opaque keyset cursors: newest first, ordered by (created_at DESC, id DESC)."""

from __future__ import annotations

import base64
import json
from datetime import datetime

from sqlalchemy import Select, and_, or_

from .errors import InvalidCursor
from .models import iso

MAX_LIMIT = 500


def encode_cursor(created_at: datetime, id_: str) -> str:
    raw = json.dumps({"t": iso(created_at), "id": id_}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        created_at = datetime.fromisoformat(data["t"].replace("Z", "+00:00"))
        id_ = data["id"]
        if created_at.tzinfo is None or not isinstance(id_, str):
            raise ValueError
    except Exception:
        raise InvalidCursor(f"invalid cursor {cursor!r}") from None
    return created_at, id_


def clamp_limit(limit: int) -> int:
    try:
        limit = int(limit)
    except (TypeError, ValueError):
        raise InvalidCursor(f"invalid limit {limit!r}") from None
    return max(1, min(limit, MAX_LIMIT))


def paginate(s, query: Select, model, *, limit: int, cursor: str | None):
    """Run ``query`` (a select of ``model``) one page at a time; returns (items, next_cursor)."""
    limit = clamp_limit(limit)
    if cursor:
        created_at, id_ = decode_cursor(cursor)
        query = query.where(
            or_(model.created_at < created_at, and_(model.created_at == created_at, model.id < id_))
        )
    query = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    items = list(s.execute(query).scalars().unique())
    if len(items) <= limit:
        return items, None
    items = items[:limit]
    return items, encode_cursor(items[-1].created_at, items[-1].id)
