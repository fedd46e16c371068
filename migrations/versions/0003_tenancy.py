"""Organisations, API keys and the organisation of every source, job and artifact (issue 5).

Existing sources, jobs and artifacts are assigned to the organisation "default" (id
``org_default``), which this revision creates. Audit events get a nullable ``organization_id``
that old events keep NULL: the table is append-only (UPDATE is refused), and the chain hash covers
the column only when it is set, so old events verify as before.

``organization_id`` on sources/jobs/artifacts has no foreign key: adding one on SQLite means
recreating those tables, and dropping ``jobs`` with ``PRAGMA foreign_keys=ON`` would cascade into
``job_targets``. The catalog functions fill it from the authenticated principal.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True)
DEFAULT_ORG_ID = "org_default"
SCOPED_TABLES = ("sources", "jobs", "artifacts")


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organizations")),
        sa.UniqueConstraint("name", name=op.f("uq_organizations_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("organization_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("key_prefix", sa.String(length=20), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("expires_at", UTC_DATETIME, nullable=True),
        sa.Column("revoked_at", UTC_DATETIME, nullable=True),
        sa.Column("last_used_at", UTC_DATETIME, nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=True),
        sa.CheckConstraint("role IN ('viewer', 'submitter', 'maintainer', 'admin')", name=op.f("ck_api_keys_role")),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"],
                                name=op.f("fk_api_keys_organization_id_organizations")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_organization_id_created_at"), "api_keys", ["organization_id", "created_at"])

    # Plain ADD COLUMN (no batch): nullable, no constraint, so SQLite never recreates the tables
    # (recreating audit_events would drop its append-only triggers).
    for table in SCOPED_TABLES:
        op.add_column(table, sa.Column("organization_id", sa.String(length=40), nullable=True))
        op.create_index(op.f(f"ix_{table}_organization_id_created_at_id"), table,
                        ["organization_id", "created_at", "id"])
    op.add_column("audit_events", sa.Column("organization_id", sa.String(length=40), nullable=True))
    op.create_index(op.f("ix_audit_events_organization_id_seq"), "audit_events", ["organization_id", "seq"])

    organizations = sa.table("organizations", sa.column("id", sa.String), sa.column("name", sa.String),
                             sa.column("created_at", UTC_DATETIME))
    now = datetime.now(UTC)
    if op.get_bind().dialect.name == "sqlite":
        now = now.replace(tzinfo=None)  # what UTCDateTime stores on SQLite
    op.bulk_insert(organizations, [{"id": DEFAULT_ORG_ID, "name": "default", "created_at": now}])
    for table in SCOPED_TABLES:
        op.execute(sa.text(f"UPDATE {table} SET organization_id = :org WHERE organization_id IS NULL")
                   .bindparams(org=DEFAULT_ORG_ID))


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_events_organization_id_seq"), table_name="audit_events")
    op.drop_column("audit_events", "organization_id")
    for table in reversed(SCOPED_TABLES):
        op.drop_index(op.f(f"ix_{table}_organization_id_created_at_id"), table_name=table)
        op.drop_column(table, "organization_id")
    op.drop_index(op.f("ix_api_keys_organization_id_created_at"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("organizations")
