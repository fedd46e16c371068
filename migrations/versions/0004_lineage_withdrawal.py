"""Withdrawal of sources and artifacts, flagged down the lineage (issue 5).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


TABLES = ("sources", "artifacts")


def _columns() -> list[sa.Column]:
    return [
        sa.Column("withdrawn_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("withdrawn_reason", sa.Text(), nullable=True),
        sa.Column("withdrawn_by", sa.String(length=200), nullable=True),
        sa.Column("withdrawn_root_type", sa.String(length=20), nullable=True),
        sa.Column("withdrawn_root_id", sa.String(length=40), nullable=True),
    ]


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            for column in _columns():
                batch.add_column(column)
            # "What did withdrawing X flag?" (the response, audits, un-withdrawal later).
            batch.create_index(f"ix_{table}_withdrawn_root_type_withdrawn_root_id",
                               ["withdrawn_root_type", "withdrawn_root_id"], unique=False)


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_withdrawn_root_type_withdrawn_root_id")
            for column in reversed(_columns()):
                batch.drop_column(column.name)
