"""Catalog search: per-organisation search tokens.

Each element of ``artifacts.search_tokens`` gets the first 6 hex digits of md5(organization_id) in
front ("=llama" -> "3fa9c1=llama"), as catalog.search.search_tokens now makes them, so an
org-scoped token condition reads that organisation's posting lists only (at 1M rows "=0" was in
370k rows of every organisation). Artifacts without an organisation keep unprefixed tokens.
Existing rows are rewritten here (Postgres in SQL with md5(); SQLite, which has no md5(), in
Python batches); on Postgres the table's secondary indexes are dropped for the rewrite and built
again from their own definitions (308 s at 1M rows on the 2-core dev machine, against 805 s with
the indexes in place; ``artifacts`` is locked meanwhile). Nothing else is recomputed. The downgrade
strips the prefixes the same way.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PREFIX_LEN = 6  # catalog.search.ORG_PREFIX_LEN at this revision (a migration does not import app code)
BATCH = 1000


def _prefix(organization_id: str) -> str:
    """catalog.search.org_token_prefix; Postgres: left(md5(organization_id), PREFIX_LEN)."""
    return hashlib.md5(organization_id.encode(), usedforsecurity=False).hexdigest()[:PREFIX_LEN]


def _rewrite_pg(element_sql: str) -> None:
    """Every row gets a new version, so each secondary index of ``artifacts`` would get an entry
    per row: at 1M rows that took 805 s with the indexes in place (the tokens' GIN index dropped),
    against 308 s for dropping them, the UPDATE and building them again from their own definitions
    (pg_indexes; those behind constraints, the primary key, stay). Either way the table is locked
    until the commit (DROP INDEX)."""
    bind = op.get_bind()
    indexes = bind.execute(sa.text(
        "SELECT indexname, indexdef FROM pg_indexes i WHERE schemaname = current_schema() AND tablename = "
        "'artifacts' AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = "
        "(quote_ident(i.schemaname) || '.' || quote_ident(i.indexname))::regclass) ORDER BY indexname")).all()
    for name, _ in indexes:
        op.execute(f'DROP INDEX "{name}"')
    # ORDINALITY keeps each array's (sorted) order; a common prefix keeps it sorted.
    op.execute(f"UPDATE artifacts SET search_tokens = ARRAY(SELECT {element_sql} FROM unnest(search_tokens) "
               "WITH ORDINALITY AS u(t, n) ORDER BY n) WHERE organization_id IS NOT NULL")
    for _, definition in indexes:
        op.execute(definition)


def _rewrite_sqlite(change) -> None:
    """``change(prefix, token)`` applied to every token of every row with an organisation, in
    batches of BATCH rows (keyset by id, so rewritten rows are not read again)."""
    bind = op.get_bind()
    last = ""
    while True:
        rows = bind.execute(sa.text(
            "SELECT id, organization_id, search_tokens FROM artifacts WHERE organization_id IS NOT NULL "
            "AND id > :last ORDER BY id LIMIT :n"), {"last": last, "n": BATCH}).all()
        if not rows:
            return
        updates = []
        for id_, org, tokens in rows:
            old = json.loads(tokens) if isinstance(tokens, str) else (tokens or [])
            updates.append({"id": id_, "t": json.dumps([change(_prefix(org), t) for t in old])})
        bind.execute(sa.text("UPDATE artifacts SET search_tokens = :t WHERE id = :id"), updates)
        last = rows[-1][0]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _rewrite_pg(f"left(md5(organization_id), {PREFIX_LEN}) || t")
    else:
        _rewrite_sqlite(lambda prefix, token: prefix + token)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _rewrite_pg(f"substr(t, {PREFIX_LEN + 1})")
    else:
        _rewrite_sqlite(lambda prefix, token: token[len(prefix):] if token.startswith(prefix) else token)
