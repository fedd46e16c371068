"""Targets run as their own tasks: per-target attempts and leases; jobs remember dispatch.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("job_targets") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("lease_expires_at", UTC_DATETIME, nullable=True))
        batch.add_column(sa.Column("worker_id", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("started_at", UTC_DATETIME, nullable=True))
        batch.add_column(sa.Column("finished_at", UTC_DATETIME, nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dispatched_at", UTC_DATETIME, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("dispatched_at")
    with op.batch_alter_table("job_targets") as batch:
        for name in ("finished_at", "started_at", "worker_id", "lease_expires_at", "attempts"):
            batch.drop_column(name)
