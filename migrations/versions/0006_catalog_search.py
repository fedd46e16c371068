"""Catalog search: filter columns and indexes for 1M-artifact pages (issue 5).

Artifacts get copies of what the catalog filters on, so every filter is a plain indexed column
(quantyard/catalog/search.py): ``architecture`` (the source's), ``label_pairs`` (the job's labels
as "key=value"; text[] on Postgres, JSON on SQLite), ``search_text`` (lower-cased filename, source
name, format, quantization), ``search_tokens`` (its words, word prefixes and suffixes, as
catalog.search.search_tokens makes them; text[] / JSON) and four metrics copied out of the JSON
``metrics``. Existing rows are
filled here; record_artifact fills new ones.

Composite btree indexes start with organization_id (every typical query is org-scoped) and end
with the sort key and id (keyset pagination). On Postgres ``label_pairs`` gets a GIN index and
``search_text`` a pg_trgm GIN index, ``search_tokens`` a GIN index; ``CREATE EXTENSION pg_trgm`` needs a role allowed to create it
(pg_trgm is a trusted extension since Postgres 13: the database owner may). Without it the index
is a plain btree under the same name and free-text search scans the org's rows (slower, correct).
SQLite gets plain indexes under the same names.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

METRICS = ("mean_kl", "top1_agreement", "cosine_min", "bits_per_weight")
BTREE_INDEXES = {
    "ix_artifacts_organization_id_format_quantization_created_at_id":
        ["organization_id", "format", "quantization", "created_at", "id"],
    "ix_artifacts_organization_id_architecture_created_at_id": ["organization_id", "architecture", "created_at", "id"],
    "ix_artifacts_organization_id_source_id_created_at_id": ["organization_id", "source_id", "created_at", "id"],
    "ix_artifacts_organization_id_size_bytes_id": ["organization_id", "size_bytes", "id"],
    "ix_artifacts_organization_id_mean_kl_id": ["organization_id", "mean_kl", "id"],
}
LABELS_INDEX = "ix_artifacts_label_pairs"
TEXT_INDEX = "ix_artifacts_search_text"
TOKENS_INDEX = "ix_artifacts_search_tokens"
AFFIX_MAX = 12  # catalog.search.AFFIX_MAX at this revision (a migration does not import app code)
# catalog.search.search_tokens in SQL: "=word", "<prefix", ">suffix" (2..AFFIX_MAX characters)
PG_TOKENS = f"""coalesce((SELECT array_agg(DISTINCT e ORDER BY e) FROM regexp_split_to_table(search_text, '[^0-9a-z]+') w,
  LATERAL (SELECT '=' || w UNION ALL
           SELECT '<' || left(w, n) FROM generate_series(2, least(length(w), {AFFIX_MAX})) n UNION ALL
           SELECT '>' || right(w, n) FROM generate_series(2, least(length(w), {AFFIX_MAX})) n) x(e)
  WHERE w <> ''), '{{}}')"""


def _add_columns(pg: bool) -> None:
    # Plain ADD COLUMN (nullable, no constraint): SQLite does not recreate the table.
    op.add_column("artifacts", sa.Column("architecture", sa.String(length=200), nullable=True))
    labels_type = postgresql.ARRAY(sa.Text()) if pg else sa.JSON()
    op.add_column("artifacts", sa.Column("label_pairs", labels_type, nullable=True))
    op.add_column("artifacts", sa.Column("search_text", sa.Text(), nullable=True))
    op.add_column("artifacts", sa.Column("search_tokens", labels_type, nullable=True))
    for name in METRICS:
        op.add_column("artifacts", sa.Column(name, sa.Float(), nullable=True))


def _backfill(pg: bool) -> None:
    op.execute(
        "UPDATE artifacts SET architecture = (SELECT architecture FROM sources WHERE sources.id = artifacts.source_id), "
        "search_text = lower(filename || ' ' || coalesce((SELECT name FROM sources WHERE sources.id = "
        "artifacts.source_id), '') || ' ' || format || ' ' || quantization)"
    )
    if pg:
        metric = "CASE WHEN jsonb_typeof(metrics->'{0}') = 'number' THEN (metrics->>'{0}')::float8 END"
        labels = ("coalesce((SELECT array_agg(key || '=' || value ORDER BY key) FROM jobs, jsonb_each_text(jobs.labels) "
                  "WHERE jobs.id = artifacts.job_id), '{}')")
    else:
        metric = "CASE WHEN json_type(metrics, '$.{0}') IN ('integer', 'real') THEN json_extract(metrics, '$.{0}') END"
        labels = ("coalesce((SELECT json_group_array(key || '=' || value) FROM (SELECT j.key, j.value FROM jobs, "
                  "json_each(jobs.labels) AS j WHERE jobs.id = artifacts.job_id ORDER BY j.key)), '[]')")
    sets = ", ".join(f"{name} = {metric.format(name)}" for name in METRICS)
    op.execute(f"UPDATE artifacts SET {sets}, label_pairs = {labels}")
    if pg:
        op.execute(f"UPDATE artifacts SET search_tokens = {PG_TOKENS}")
    else:
        _sqlite_tokens()


def _tokens(text: str | None) -> list[str]:
    out: set[str] = set()
    for word in re.findall("[0-9a-z]+", text or ""):
        out.add("=" + word)
        for n in range(2, min(len(word), AFFIX_MAX) + 1):
            out.update(("<" + word[:n], ">" + word[-n:]))
    return sorted(out)


def _sqlite_tokens() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id, search_text FROM artifacts")).all()
    for id_, text in rows:
        bind.execute(sa.text("UPDATE artifacts SET search_tokens = :t WHERE id = :id"),
                     {"t": json.dumps(_tokens(text)), "id": id_})


def _trigram_available() -> bool:
    bind = op.get_bind()
    try:
        with bind.begin_nested():  # a savepoint: a refused CREATE EXTENSION leaves the migration going
            bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except sa.exc.DBAPIError as exc:
        log.warning("pg_trgm is not available (%s); free-text search will not use a trigram index",
                    str(exc.orig).strip().splitlines()[0])
        return False
    return True


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    _add_columns(pg)
    _backfill(pg)
    for name, columns in BTREE_INDEXES.items():
        op.create_index(name, "artifacts", columns)
    if not pg:
        op.create_index(LABELS_INDEX, "artifacts", ["label_pairs"])
        op.create_index(TEXT_INDEX, "artifacts", ["search_text"])
        op.create_index(TOKENS_INDEX, "artifacts", ["search_tokens"])
        return
    op.create_index(LABELS_INDEX, "artifacts", ["label_pairs"], postgresql_using="gin")
    op.create_index(TOKENS_INDEX, "artifacts", ["search_tokens"], postgresql_using="gin")
    if _trigram_available():
        op.create_index(TEXT_INDEX, "artifacts", ["search_text"], postgresql_using="gin",
                        postgresql_ops={"search_text": "gin_trgm_ops"})
    else:
        op.create_index(TEXT_INDEX, "artifacts", ["search_text"])


def downgrade() -> None:
    for name in (TOKENS_INDEX, TEXT_INDEX, LABELS_INDEX, *reversed(BTREE_INDEXES)):
        op.drop_index(name, table_name="artifacts")
    with op.batch_alter_table("artifacts") as batch:
        for name in (*reversed(METRICS), "search_tokens", "search_text", "label_pairs", "architecture"):
            batch.drop_column(name)
