"""Catalog search: filtered, keyset-paginated artifact listings (issue 5).

Built so that every typical org-scoped page at 1,000,000 artifacts on Postgres is one index range
scan that stops after ``limit + 1`` rows (benchmarks/bench_catalog_search.py measures it):

- the filterable facts live in plain columns of ``artifacts``, filled by ``record_artifact``:
  ``architecture`` (the source's), ``label_pairs`` (the job's labels as "key=value" strings),
  ``search_text`` (lower-cased filename, source name, format, quantization), ``search_tokens``
  (the words of ``search_text`` with their short prefixes and suffixes, see below) and the metrics
  ``mean_kl``, ``top1_agreement``, ``cosine_min``, ``bits_per_weight`` (copied out of the JSON
  ``metrics``: portable to SQLite, plain btree indexes, real column statistics for the planner);
- composite indexes start with ``organization_id`` and end with the sort key and ``id``
  (migration 0006); on Postgres ``label_pairs`` and ``search_tokens`` are text[] with GIN indexes
  and ``search_text`` has a pg_trgm GIN index for ``LIKE '%...%'``;
- cursors compare row values ``(key, id) < (:key, :id)``, which Postgres turns into an index bound
  (an ``OR`` of the two comparisons would make it read and drop every earlier row).

Free text ``q`` is a substring of ``search_text`` (always checked with LIKE). A long ``q`` on the
trigram index alone is slow (every trigram of "llama-0.1b-instruct-v4" is required and "ins",
"uct", ... are in a quarter of the rows: 65 ms of posting-list merging at 1M rows). Each word of
``q`` is a whole word, a word's end or a word's start of the matching text, so the row's
``search_tokens`` must hold "=word", ">end" or "<start" for it (``query_tokens``): an exact text[]
containment on a GIN index with far shorter lists, with the LIKE as recheck. Used from
TOKEN_PATH_MIN such conditions on; shorter ``q`` (one word, a sha256 prefix, one word and a
short one) keeps the trigram index. The tokens are per organisation (each starts with a short
hash of the artifact's organization_id, migration 0007), so an org-scoped search reads only its
organisation's posting lists and matching rows; a search without an organisation (internal
callers) uses the trigram index.

Which index reads a free-text page is decided at run time, not by the planner (whose LIKE
estimates swing with each ANALYZE sample): first a walk of at most 40 rows per page row in page
order with the text as a plain filter (fills the page for any text in 1 of 40 of the rows the other
filters pass), and only if that does not fill it, the text index first (``_free_text_page``).

Sorts: ``created`` (newest first, the default), ``size`` (smallest first), ``mean_kl`` (lowest
KL first; only artifacts that have a KL). Each cursor names its sort.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Float,
    String,
    Text,
    cast,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    tuple_,
    type_coerce,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, aliased

from .errors import InvalidArgument, InvalidCursor
from .models import Artifact, UTCDateTime, iso
from .pagination import clamp_limit

SORTS = ("created", "size", "mean_kl")

# metric key in Artifact.metrics -> the column that holds a copy of it
METRIC_COLUMNS = {
    "mean_kl": "mean_kl",
    "top1_agreement": "top1_agreement",
    "cosine_min": "cosine_min",
    "bits_per_weight": "bits_per_weight",
}

_HEX = re.compile(r"^[0-9a-f]{8,64}$")


# ------------------------------------------------------------------ what record_artifact stores


def metric_values(metrics: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The denormalised metric columns for a metrics dict (non-numbers and NaN become NULL)."""
    out: dict[str, float | None] = {}
    for key, column in METRIC_COLUMNS.items():
        value = (metrics or {}).get(key)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        out[column] = float(value) if ok and value is not None else None
    return out


def label_pairs(labels: Mapping[str, Any] | None) -> list[str]:
    return sorted(f"{k}={v}" for k, v in (labels or {}).items())


def search_text(*, filename: str, source_name: str | None, format: str, quantization: str) -> str:
    return " ".join(p for p in (filename, source_name or "", format, quantization) if p).lower()


# A word is a run of [0-9a-z] in the lower-cased text (the same split in migration 0006's SQL).
_WORD = re.compile(r"[0-9a-z]+")
# Prefixes/suffixes kept per word: 2..AFFIX_MAX characters (a longer word end in ``q`` is cut to
# this length, still a necessary condition; 1-character ends would be huge lists and are skipped).
AFFIX_MAX = 12


# Tokens are per organisation: each starts with ORG_PREFIX_LEN hex digits of md5(organization_id)
# (migration 0007 computes the same with Postgres' md5()), so an org-scoped token condition reads
# that organisation's posting lists only: "=0" was in 370k rows of every organisation at 1M rows.
# A collision of two organisations' prefixes only adds rows that the organization_id filter drops.
# An artifact without an organisation keeps unprefixed tokens (only org-scoped searches use them).
ORG_PREFIX_LEN = 6


def org_token_prefix(organization_id: str | None) -> str:
    if organization_id is None:
        return ""
    return hashlib.md5(organization_id.encode(), usedforsecurity=False).hexdigest()[:ORG_PREFIX_LEN]


def search_tokens(text_: str | None, *, organization_id: str | None = None) -> list[str]:
    """The elements ``search_tokens`` holds for a ``search_text`` of an artifact of
    ``organization_id``: "=w" for each word w, "<p" for its prefixes and ">s" for its suffixes of
    2..AFFIX_MAX characters, each after the organisation's prefix; sorted, distinct."""
    out: set[str] = set()
    for word in _WORD.findall(text_ or ""):
        out.add("=" + word)
        for n in range(2, min(len(word), AFFIX_MAX) + 1):
            out.add("<" + word[:n])
            out.add(">" + word[-n:])
    prefix = org_token_prefix(organization_id)
    return sorted(prefix + token for token in out)


def query_tokens(q: str, *, organization_id: str | None = None) -> list[str]:
    """Elements every row of ``organization_id`` whose ``search_text`` contains ``q`` has in
    ``search_tokens`` (empty when ``q`` is one word with no separator around it: an infix, left to
    the trigram index)."""
    prefix = org_token_prefix(organization_id)
    matches = list(_WORD.finditer(q))
    out = []
    for m in matches:
        word = m.group()
        starts = m.start() > 0           # a separator before it in q: the text's word starts here
        ends = m.end() < len(q)          # a separator after it: the text's word ends here
        if starts and ends:
            out.append("=" + word)
        elif starts and len(word) >= 2:
            out.append("<" + word[:AFFIX_MAX])
        elif ends and len(word) >= 2:
            out.append(">" + word[-AFFIX_MAX:])
    return sorted({prefix + token for token in out})


# ------------------------------------------------------------------------- argument parsing


def _integer(name: str, value: Any) -> int | None:
    number = _number(name, value, integer=True)
    return None if number is None else int(number)


def _number(name: str, value: Any, *, integer: bool = False) -> float | int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError):
        kind = "an integer" if integer else "a number"
        raise InvalidArgument(f"{name} must be {kind}, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise InvalidArgument(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def _time(name: str, value: Any) -> datetime | None:
    """ISO 8601; a value without a zone is UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise InvalidArgument(f"{name} must be an ISO 8601 time (e.g. 2026-01-31T12:00:00Z), "
                                  f"got {value!r}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_labels(label: str | Iterable[str] | Mapping[str, Any] | None) -> list[str]:
    """"key=value" strings (one, several, or a mapping); all of them must match."""
    if label is None:
        return []
    if isinstance(label, Mapping):
        return label_pairs(label)
    items = [label] if isinstance(label, str) else list(label)
    for item in items:
        key = item.split("=", 1)[0] if isinstance(item, str) else ""
        if not isinstance(item, str) or "=" not in item or not key:
            raise InvalidArgument(f"label must be key=value, got {item!r}")
    return sorted(set(items))


def _canonical_quantization(value: str) -> str:
    """The manifest's spelling of a quantization ("q4_k_m" -> "Q4_K_M"), so the filter is an
    equality on the stored column (indexable); unknown names are matched as given."""
    from quantyard.engine.manifest import MANIFEST

    for spec in MANIFEST["formats"].values():
        for known in spec["quantizations"]:
            if known.lower() == value.lower():
                return known
    return value


@dataclass(frozen=True)
class Filters:
    organization_id: str | None = None
    format: str | None = None
    quantization: str | None = None
    architecture: str | None = None
    source_id: str | None = None
    job_id: str | None = None
    labels: tuple[str, ...] = ()
    min_size: int | None = None
    max_size: int | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    max_mean_kl: float | None = None
    min_top1: float | None = None
    min_cosine: float | None = None
    max_bits_per_weight: float | None = None
    q: str | None = None


def make_filters(**raw: Any) -> Filters:
    """Validate raw filter values (strings from a query string, or typed values); a bad value
    raises InvalidArgument naming the parameter."""
    f = Filters(
        organization_id=raw.get("organization_id"),
        format=(raw.get("format") or "").strip().lower() or None,
        quantization=_canonical_quantization(raw["quantization"].strip()) if raw.get("quantization") else None,
        architecture=raw.get("architecture") or None,
        source_id=raw.get("source_id") or None,
        job_id=raw.get("job_id") or None,
        labels=tuple(parse_labels(raw.get("label"))),
        min_size=_integer("min_size", raw.get("min_size")),
        max_size=_integer("max_size", raw.get("max_size")),
        created_after=_time("created_after", raw.get("created_after")),
        created_before=_time("created_before", raw.get("created_before")),
        max_mean_kl=_number("max_mean_kl", raw.get("max_mean_kl")),
        min_top1=_number("min_top1", raw.get("min_top1")),
        min_cosine=_number("min_cosine", raw.get("min_cosine")),
        max_bits_per_weight=_number("max_bits_per_weight", raw.get("max_bits_per_weight")),
        q=(raw.get("q") or "").strip().lower() or None,
    )
    if f.min_size is not None and f.max_size is not None and f.min_size > f.max_size:
        raise InvalidArgument(f"min_size ({f.min_size}) is larger than max_size ({f.max_size})")
    if f.created_after and f.created_before and f.created_after >= f.created_before:
        raise InvalidArgument("created_after must be earlier than created_before")
    if f.min_cosine is not None and f.min_cosine > 1:
        raise InvalidArgument(f"min_cosine must be <= 1, got {f.min_cosine}")
    if f.min_top1 is not None and f.min_top1 > 1:
        raise InvalidArgument(f"min_top1 must be <= 1, got {f.min_top1}")
    return f


# ------------------------------------------------------------------------------- the query


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _has_labels(dialect: str, pairs: tuple[str, ...], A=Artifact):
    if dialect == "postgresql":
        # text[] @> ARRAY[...]: the GIN index, and per-element statistics for the planner
        return type_coerce(A.label_pairs, postgresql.ARRAY(Text)).contains(
            cast(postgresql.array(list(pairs)), postgresql.ARRAY(Text)))
    conditions = []
    for pair in pairs:
        each = func.json_each(A.label_pairs).table_valued("value")
        conditions.append(exists().select_from(each).where(each.c.value == pair))
    return conditions


# The token path from this many token conditions on. Two already pay: "granite-70b" (">granite",
# "<70b") is a 6 ms token bitmap against 19 ms of trigrams for the same 4,062 rows at 1M rows; with
# 5 ("llama-0.1b-instruct-v4") tokens take 27 ms, trigrams 77 ms. (A lone token can be a far weaker
# condition than the trigrams: "a-0.1" gives only "=0".) The text index is only read text-first,
# fenced from the other filters (``_text_first_query``): the token bitmap, estimated less
# selective, had been ANDed with an (organization_id, format, ...) range of 200k entries (55 ms).
TOKEN_PATH_MIN = 2


def _text_match(q: str, dialect: str, A=Artifact, *, organization_id: str | None = None):
    # Tokens are per organisation: without one (internal callers) the trigram index answers.
    scoped = dialect == "postgresql" and organization_id is not None
    tokens = query_tokens(q, organization_id=organization_id) if scoped else []
    if len(tokens) >= TOKEN_PATH_MIN:
        # The token index narrows; the LIKE on an expression (not the pg_trgm index, which the
        # planner would otherwise AND in at the very cost this avoids) keeps substring semantics.
        contains = type_coerce(A.search_tokens, postgresql.ARRAY(Text)).contains(
            cast(postgresql.array(tokens), postgresql.ARRAY(Text)))
        return contains & A.search_text.concat("").like(_like(q), escape="\\")
    match = A.search_text.like(_like(q), escape="\\")
    if _HEX.match(q):
        # a sha256 prefix, as a range (a btree bound on any collation; LIKE 'x%' is not)
        return or_(match, A.sha256.between(q, q + "g"))
    return match


def _where(query, f: Filters, dialect: str, A=Artifact):
    """``query`` narrowed by every filter of ``f``, on ``A`` (Artifact or an alias of it)."""
    equal = {A.organization_id: f.organization_id, A.format: f.format, A.quantization: f.quantization,
             A.architecture: f.architecture, A.source_id: f.source_id, A.job_id: f.job_id}
    query = query.where(*(col == value for col, value in equal.items() if value is not None))
    if f.labels:
        cond = _has_labels(dialect, f.labels, A)
        query = query.where(*(cond if isinstance(cond, list) else [cond]))
    bounds = [
        (A.size_bytes >= f.min_size) if f.min_size is not None else None,
        (A.size_bytes <= f.max_size) if f.max_size is not None else None,
        (A.created_at >= f.created_after) if f.created_after is not None else None,
        (A.created_at < f.created_before) if f.created_before is not None else None,
        (A.mean_kl <= f.max_mean_kl) if f.max_mean_kl is not None else None,
        (A.top1_agreement >= f.min_top1) if f.min_top1 is not None else None,
        (A.cosine_min >= f.min_cosine) if f.min_cosine is not None else None,
        (A.bits_per_weight <= f.max_bits_per_weight) if f.max_bits_per_weight is not None else None,
        _text_match(f.q, dialect, A, organization_id=f.organization_id) if f.q else None,
    ]
    return query.where(*(b for b in bounds if b is not None))


def visibility(query, *, include_withdrawn: bool, include_deleted: bool, entity=Artifact):
    """Hides withdrawn artifacts (and those flagged by an ancestor's withdrawal) and soft-deleted
    ones unless asked for."""
    if not include_withdrawn:
        query = query.where(entity.withdrawn_at.is_(None))
    if not include_deleted:
        query = query.where(entity.deleted_at.is_(None))
    return query


# --------------------------------------------------------------------------------- cursors


@dataclass(frozen=True)
class _Sort:
    name: str
    column: Any          # the sort key column
    descending: bool
    key_type: Any        # SQL type of the key in a cursor


def _sort(name: str) -> _Sort:
    if name == "created":
        return _Sort("created", Artifact.created_at, True, UTCDateTime())
    if name == "size":
        return _Sort("size", Artifact.size_bytes, False, BigInteger())
    if name == "mean_kl":
        return _Sort("mean_kl", Artifact.mean_kl, False, Float())
    raise InvalidArgument(f"sort must be one of {', '.join(SORTS)}, got {name!r}")


def _key_of(sort: _Sort, art: Artifact) -> Any:
    value = getattr(art, sort.column.key)
    return iso(value) if sort.name == "created" else value


def encode_cursor(sort: _Sort, art: Artifact) -> str:
    raw = json.dumps({"s": sort.name, "k": _key_of(sort, art), "id": art.id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(sort: _Sort, cursor: str) -> tuple[Any, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        key, id_ = data["k"], data["id"]
        if data["s"] != sort.name or not isinstance(id_, str):
            raise ValueError
        if sort.name == "created":
            key = datetime.fromisoformat(key)
            if key.tzinfo is None:
                raise ValueError
        elif sort.name == "size":
            key = int(key)
        else:
            key = float(key)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidCursor(f"invalid cursor {cursor!r} for sort={sort.name}") from None
    return key, id_


def _after(sort: _Sort, key: Any, id_: str, A=Artifact):
    row = tuple_(getattr(A, sort.column.key), A.id)
    bound = tuple_(literal(key, sort.key_type), literal(id_, String()))
    return row < bound if sort.descending else row > bound


# ---------------------------------------------------------------------------------- search


def _order_keys(order: _Sort, A=Artifact) -> list:
    key, id_ = getattr(A, order.column.key), A.id
    return [key.desc(), id_.desc()] if order.descending else [key.asc(), id_.asc()]


def _filtered(f: Filters, *, dialect: str, order: _Sort, cursor: str | None, include_withdrawn: bool,
              include_deleted: bool, A=Artifact, query=None):
    """SELECT ``A`` (or ``query``) narrowed by the filters, visibility, the sort's own condition
    and the cursor."""
    query = _where(select(A) if query is None else query, f, dialect, A)
    query = visibility(query, include_withdrawn=include_withdrawn, include_deleted=include_deleted, entity=A)
    if order.name == "mean_kl":
        query = query.where(A.mean_kl.is_not(None))
    if cursor:
        query = query.where(_after(order, *decode_cursor(order, cursor), A))
    return query


def build_query(f: Filters, *, dialect: str, sort: str = "created", cursor: str | None = None,
                include_withdrawn: bool = False, include_deleted: bool = False, limit: int = 50):
    """The SELECT for one page (``limit + 1`` rows, to know whether there is a next page)."""
    order = _sort(sort)
    query = _filtered(f, dialect=dialect, order=order, cursor=cursor, include_withdrawn=include_withdrawn,
                      include_deleted=include_deleted)
    return query.order_by(*_order_keys(order)).limit(clamp_limit(limit) + 1)


# Free text on Postgres is decided at run time, not by the planner. Its LIKE estimate for
# '%granite-70b%' is the share of ~100 sampled values that match, 0 or 1 from one ANALYZE to the
# next, and its plan flipped between the trigram index (22 ms) and walking the org's newest-first
# index with a filter (76 ms); for "instruct-v4" (5% of the org) both index plans read every match
# (250-400 ms) where the walk stops after ~1,000 rows. So:
# 1. walk the page order with the text as a plain filter, at most WALK_ROWS_PER_ROW * (limit + 1)
#    rows: a text in at least 1 of 40 of the rows the other filters pass fills the page there
#    (a common word: ~200 rows), and so does any filter set passing fewer rows than that;
# 2. otherwise the text is rare there: read it from its index first (every match in the catalog),
#    the other filters applied to those rows, then sort (``_text_first_query``).
WALK_ROWS_PER_ROW = 40


def _subquery_order(order: _Sort, sub) -> list:
    """The page order on a subquery's (key, id) columns."""
    key, id_ = sub.c[order.column.key], sub.c.id
    return [key.desc(), id_.desc()] if order.descending else [key.asc(), id_.asc()]


def walk_rows(limit: int) -> int:
    return WALK_ROWS_PER_ROW * (clamp_limit(limit) + 1)


def _plain_text_match(q: str, columns) -> Any:
    """``_text_match`` as a row filter (no index): the LIKE, or a sha256 prefix."""
    match = columns.search_text.like(_like(q), escape="\\")
    return or_(match, columns.sha256.between(q, q + "g")) if _HEX.match(q) else match


def _walk_query(f: Filters, *, sort: str, cursor: str | None, include_withdrawn: bool, include_deleted: bool,
                limit: int):
    """The first ``walk_rows(limit)`` rows the other filters pass, in page order (an index walk the
    planner chooses as for any structured page), filtered by the text. Returns rows (artifact,
    hit, position); the last walked row comes back too (position == walk_rows) so a capped walk
    can be told from an exhausted one. The walk carries only the columns it needs (row_number
    keeps what it numbers: whole rows cost a third more); matches are joined back by id."""
    order = _sort(sort)
    cap = walk_rows(limit)
    keys = _order_keys(order)
    A = Artifact
    walked = (_filtered(replace(f, q=None), dialect="postgresql", order=order, cursor=cursor,
                        include_withdrawn=include_withdrawn, include_deleted=include_deleted)
              .with_only_columns(A.id, order.column, A.search_text, A.sha256,
                                 func.row_number().over(order_by=keys).label("walk_pos"))
              .order_by(*keys).limit(cap).subquery("walked"))
    hit = _plain_text_match(f.q or "", walked.c)
    page_order = _subquery_order(order, walked)
    return (select(A, hit.label("hit"), walked.c.walk_pos)
            .join_from(walked, A, A.id == walked.c.id)
            .where(or_(hit, walked.c.walk_pos == cap))
            .order_by(*page_order)
            .limit(clamp_limit(limit) + 2))


def _text_first_query(f: Filters, *, sort: str, cursor: str | None, include_withdrawn: bool,
                      include_deleted: bool, limit: int):
    """Every row the text matches, read through its own index (OFFSET 0 fences the subquery, so no
    other condition reaches it), then the other filters and the page's sort. Left to itself the
    planner ANDed the text bitmap with an (organization_id, ...) range of 100k+ entries whenever it
    expected a few thousand matches (52-67 ms, 340 ms with a third index, instead of 22 ms). Only
    ids and sort keys are sorted; the page's rows are joined back by id (whole rows: 70 -> 27 ms)."""
    order = _sort(sort)
    text_match = _text_match(f.q or "", "postgresql", organization_id=f.organization_id)
    matching = select(Artifact).where(text_match).offset(0).subquery("matching")
    t = aliased(Artifact, matching)
    page = (_filtered(replace(f, q=None), dialect="postgresql", order=order, cursor=cursor,
                      include_withdrawn=include_withdrawn, include_deleted=include_deleted, A=t,
                      query=select(t.id, getattr(t, order.column.key)))
            .order_by(*_order_keys(order, t)).limit(clamp_limit(limit) + 1).subquery("page"))
    return select(Artifact).join_from(page, Artifact, Artifact.id == page.c.id).order_by(*_subquery_order(order, page))


def _free_text_page(s: Session, f: Filters, *, sort: str, cursor: str | None, include_withdrawn: bool,
                    include_deleted: bool, limit: int) -> tuple[list[Artifact], str]:
    """A free-text page on Postgres and the plan that answered it: "walk" or "text-index"."""
    opts: dict[str, Any] = {"sort": sort, "cursor": cursor, "include_withdrawn": include_withdrawn,
                            "include_deleted": include_deleted}
    # The walk is meant as an index walk that stops early; on a small table the planner would
    # rather read the whole org and sort it (harmless there, but never what the walk is for). The
    # text-first query runs under the same setting: a bitmap of the text index, never a scan of
    # the whole table. The caller's setting is back before returning.
    previous = s.execute(text("SELECT current_setting('enable_seqscan'), "
                              "set_config('enable_seqscan', 'off', true)")).scalar_one()
    try:
        rows = s.execute(_walk_query(f, limit=limit, **opts)).all()
        hits = [art for art, hit, _ in rows if hit]
        capped = any(pos == walk_rows(limit) for _, _, pos in rows)
        if len(hits) > limit or not capped:
            return hits[:limit + 1], "walk"
        return list(s.execute(_text_first_query(f, limit=limit, **opts)).scalars()), "text-index"
    finally:
        s.execute(text("SELECT set_config('enable_seqscan', :value, true)"), {"value": previous})


def search_page(s: Session, f: Filters, *, sort: str = "created", cursor: str | None = None,
                include_withdrawn: bool = False, include_deleted: bool = False,
                limit: int = 50) -> tuple[list[Artifact], str]:
    """Up to ``limit + 1`` artifacts of one page and the plan used ("query", or for free text on
    Postgres "walk" / "text-index"); ``search_artifacts`` is the public entry."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        # psycopg prepares a statement after 5 runs, and Postgres then may switch to a generic
        # plan that ignores the values: for a time or size range it picked a bitmap scan + sort
        # of every matching row (170 ms instead of 2 ms at 1M rows). Plan for the values given.
        s.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        if f.q:
            return _free_text_page(s, f, sort=sort, cursor=cursor, include_withdrawn=include_withdrawn,
                                   include_deleted=include_deleted, limit=limit)
    query = build_query(f, dialect=dialect, sort=sort, cursor=cursor, include_withdrawn=include_withdrawn,
                        include_deleted=include_deleted, limit=limit)
    return list(s.execute(query).scalars()), "query"


def search_artifacts(
    s: Session,
    *,
    organization_id: str | None = None,
    format: str | None = None,
    quantization: str | None = None,
    architecture: str | None = None,
    source_id: str | None = None,
    job_id: str | None = None,
    label: str | Iterable[str] | Mapping[str, Any] | None = None,
    min_size: int | str | None = None,
    max_size: int | str | None = None,
    created_after: datetime | str | None = None,
    created_before: datetime | str | None = None,
    max_mean_kl: float | str | None = None,
    min_top1: float | str | None = None,
    min_cosine: float | str | None = None,
    max_bits_per_weight: float | str | None = None,
    q: str | None = None,
    sort: str = "created",
    limit: int = 50,
    cursor: str | None = None,
    include_withdrawn: bool = False,
    include_deleted: bool = False,
) -> tuple[list[Artifact], str | None]:
    """One page of artifacts matching every given filter, and the cursor of the next page (None
    on the last). Bad values raise InvalidArgument naming the parameter; bad cursors InvalidCursor.
    ``format``/``quantization`` match case-insensitively; ``q`` is a case-insensitive substring of
    the filename, source name, format or quantization, or a sha256 prefix (8+ hex digits)."""
    filters = make_filters(
        organization_id=organization_id, format=format, quantization=quantization, architecture=architecture,
        source_id=source_id, job_id=job_id, label=label, min_size=min_size, max_size=max_size,
        created_after=created_after, created_before=created_before, max_mean_kl=max_mean_kl, min_top1=min_top1,
        min_cosine=min_cosine, max_bits_per_weight=max_bits_per_weight, q=q,
    )
    limit = clamp_limit(limit)
    items, _ = search_page(s, filters, sort=sort, cursor=cursor, include_withdrawn=include_withdrawn,
                           include_deleted=include_deleted, limit=limit)
    if len(items) <= limit:
        return items, None
    items = items[:limit]
    return items, encode_cursor(_sort(sort), items[-1])
