"""Retention: soft delete, purge after a grace period, legal hold; reused targets (issue 5).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True)


def _artifact_columns() -> list[sa.Column]:
    return [
        sa.Column("deleted_at", UTC_DATETIME, nullable=True),
        sa.Column("deleted_by", sa.String(length=200), nullable=True),
        sa.Column("delete_reason", sa.Text(), nullable=True),
        sa.Column("purge_after", UTC_DATETIME, nullable=True),
        sa.Column("purged_at", UTC_DATETIME, nullable=True),
        sa.Column("legal_hold_at", UTC_DATETIME, nullable=True),
        sa.Column("legal_hold_by", sa.String(length=200), nullable=True),
        sa.Column("legal_hold_reason", sa.Text(), nullable=True),
    ]


def upgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        for column in _artifact_columns():
            batch.add_column(column)
        # The purge step's scan: soft-deleted artifacts whose grace period is over.
        batch.create_index("ix_artifacts_purge_after", ["purge_after"], unique=False)
    with op.batch_alter_table("job_targets") as batch:
        batch.add_column(sa.Column("reused", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("reused_from_job", sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_targets") as batch:
        batch.drop_column("reused_from_job")
        batch.drop_column("reused")
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_index("ix_artifacts_purge_after")
        for column in reversed(_artifact_columns()):
            batch.drop_column(column.name)
