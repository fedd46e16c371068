"""Reconciler: a counter of the messages it re-sent, per kind (issue 10).

The worker-side reconciler (worker/reconciler.py) re-sends the Celery message of a job or target
whose message may be gone; each re-send is audited (``job.resend``) and counted here, so /metrics
(read by any API replica from the catalog) reports ``quantyard_reconciler_resends_total{kind}``
without scanning the audit chain.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reconciler_resends",
        sa.Column("kind", sa.String(length=50), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("kind", name=op.f("pk_reconciler_resends")),
    )


def downgrade() -> None:
    op.drop_table("reconciler_resends")
