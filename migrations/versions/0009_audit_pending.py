"""Audit events waiting to be chained (``QUANTYARD_AUDIT_CHAIN=deferred``).

With deferred chaining a change writes its audit event here, in its own transaction and without
the chain lock; a sealer moves committed events into ``audit_events`` in batches, computing seq
and hashes there (quantyard/catalog/audit_seal.py). Guard: nobody updates a waiting event, and one
is deleted only once an event with its id is in the chain (the sealer's DELETE in the same
transaction as its INSERT), so a committed event cannot be removed without being chained first.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True)
JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

PG_GUARD = [
    """
    CREATE FUNCTION audit_pending_guard() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' AND EXISTS (SELECT 1 FROM audit_events WHERE id = OLD.id) THEN
            RETURN OLD;
        END IF;
        RAISE EXCEPTION 'audit_pending: % refused (an event leaves only into the chain)', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    """
    CREATE TRIGGER audit_pending_guard BEFORE UPDATE OR DELETE ON audit_pending
    FOR EACH ROW EXECUTE FUNCTION audit_pending_guard()
    """,
    """
    CREATE TRIGGER audit_pending_no_truncate BEFORE TRUNCATE ON audit_pending
    FOR EACH STATEMENT EXECUTE FUNCTION audit_pending_guard()
    """,
]
SQLITE_GUARD = [
    """
    CREATE TRIGGER audit_pending_no_update BEFORE UPDATE ON audit_pending
    BEGIN SELECT RAISE(ABORT, 'audit_pending: UPDATE refused'); END
    """,
    """
    CREATE TRIGGER audit_pending_guard BEFORE DELETE ON audit_pending
    WHEN NOT EXISTS (SELECT 1 FROM audit_events WHERE id = OLD.id)
    BEGIN SELECT RAISE(ABORT, 'audit_pending: DELETE refused (an event leaves only into the chain)'); END
    """,
]


def upgrade() -> None:
    op.create_table(
        "audit_pending",
        sa.Column("pending_seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True,
                  nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("at", UTC_DATETIME, nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=100), nullable=False),
        sa.Column("resource_type", sa.String(length=50), nullable=False),
        sa.Column("resource_id", sa.String(length=200), nullable=True),
        sa.Column("outcome", sa.String(length=50), nullable=False),
        sa.Column("request_id", sa.String(length=200), nullable=True),
        sa.Column("source_ip", sa.String(length=100), nullable=True),
        sa.Column("user_agent", sa.Text(), nullable=True),
        sa.Column("details", JSON_TYPE, nullable=False),
        sa.Column("organization_id", sa.String(length=40), nullable=True),
        sa.PrimaryKeyConstraint("pending_seq", name=op.f("pk_audit_pending")),
        sa.UniqueConstraint("id", name=op.f("uq_audit_pending_id")),
    )
    dialect = op.get_bind().dialect.name
    for statement in PG_GUARD if dialect == "postgresql" else SQLITE_GUARD if dialect == "sqlite" else []:
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.drop_table("audit_pending")  # its triggers go with it
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS audit_pending_guard()")
