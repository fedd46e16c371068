"""Initial catalog: sources, jobs, job targets, artifacts, lineage, audit events, workers.

The same schema on SQLite and Postgres (JSONB and timestamptz on Postgres). audit_events is
append-only: triggers refuse UPDATE and DELETE (and TRUNCATE on Postgres) on both backends.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True)
JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

PG_AUDIT_GUARD = [
    """
    CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    """
    CREATE TRIGGER audit_events_no_update_delete BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()
    """,
    """
    CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()
    """,
]
PG_AUDIT_UNGUARD = [
    "DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events",
    "DROP TRIGGER IF EXISTS audit_events_no_update_delete ON audit_events",
    "DROP FUNCTION IF EXISTS audit_events_append_only()",
]
SQLITE_AUDIT_GUARD = [
    """
    CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
    BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: UPDATE refused'); END
    """,
    """
    CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
    BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: DELETE refused'); END
    """,
]
SQLITE_AUDIT_UNGUARD = [
    "DROP TRIGGER IF EXISTS audit_events_no_update",
    "DROP TRIGGER IF EXISTS audit_events_no_delete",
]


def _audit_guard(install: bool) -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        statements = PG_AUDIT_GUARD if install else PG_AUDIT_UNGUARD
    elif dialect == "sqlite":
        statements = SQLITE_AUDIT_GUARD if install else SQLITE_AUDIT_UNGUARD
    else:
        statements = []
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    op.create_table('audit_events',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('at', UTC_DATETIME, nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('action', sa.String(length=100), nullable=False),
    sa.Column('resource_type', sa.String(length=50), nullable=False),
    sa.Column('resource_id', sa.String(length=200), nullable=True),
    sa.Column('outcome', sa.String(length=50), nullable=False),
    sa.Column('request_id', sa.String(length=200), nullable=True),
    sa.Column('source_ip', sa.String(length=100), nullable=True),
    sa.Column('user_agent', sa.Text(), nullable=True),
    sa.Column('details', JSON_TYPE, nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_audit_events')),
    sa.UniqueConstraint('id', name=op.f('uq_audit_events_id')),
    sa.UniqueConstraint('prev_hash', name=op.f('uq_audit_events_prev_hash'))
    )
    op.create_index(op.f('ix_audit_events_at'), 'audit_events', ['at'], unique=False)
    op.create_index(op.f('ix_audit_events_resource_type_resource_id'), 'audit_events', ['resource_type', 'resource_id'], unique=False)

    op.create_table('lineage_edges',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('parent_type', sa.String(length=20), nullable=False),
    sa.Column('parent_id', sa.String(length=40), nullable=False),
    sa.Column('child_type', sa.String(length=20), nullable=False),
    sa.Column('child_id', sa.String(length=40), nullable=False),
    sa.Column('recipe', JSON_TYPE, nullable=False),
    sa.Column('recipe_hash', sa.String(length=64), nullable=True),
    sa.Column('created_at', UTC_DATETIME, nullable=False),
    sa.CheckConstraint("child_type IN ('source', 'artifact')", name=op.f('ck_lineage_edges_child_type')),
    sa.CheckConstraint("parent_type IN ('source', 'artifact')", name=op.f('ck_lineage_edges_parent_type')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_lineage_edges'))
    )
    op.create_index(op.f('ix_lineage_edges_child_type_child_id'), 'lineage_edges', ['child_type', 'child_id'], unique=False)
    op.create_index(op.f('ix_lineage_edges_parent_type_parent_id'), 'lineage_edges', ['parent_type', 'parent_id'], unique=False)

    op.create_table('sources',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=500), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('storage_key', sa.Text(), nullable=False),
    sa.Column('architecture', sa.String(length=200), nullable=True),
    sa.Column('metadata', JSON_TYPE, nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=True),
    sa.Column('created_at', UTC_DATETIME, nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sources'))
    )
    op.create_index(op.f('ix_sources_created_at_id'), 'sources', ['created_at', 'id'], unique=False)
    op.create_index(op.f('ix_sources_sha256'), 'sources', ['sha256'], unique=False)

    op.create_table('workers',
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('hardware_class', sa.String(length=50), nullable=False),
    sa.Column('capabilities', JSON_TYPE, nullable=False),
    sa.Column('started_at', UTC_DATETIME, nullable=False),
    sa.Column('last_heartbeat_at', UTC_DATETIME, nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers'))
    )
    op.create_index(op.f('ix_workers_hardware_class_last_heartbeat_at'), 'workers', ['hardware_class', 'last_heartbeat_at'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('source_id', sa.String(length=40), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('progress_message', sa.Text(), nullable=True),
    sa.Column('hardware_class', sa.String(length=50), nullable=False),
    sa.Column('labels', JSON_TYPE, nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('lease_expires_at', UTC_DATETIME, nullable=True),
    sa.Column('worker_id', sa.String(length=200), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('error_code', sa.String(length=100), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('warnings', JSON_TYPE, nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=True),
    sa.Column('created_at', UTC_DATETIME, nullable=False),
    sa.Column('started_at', UTC_DATETIME, nullable=True),
    sa.Column('finished_at', UTC_DATETIME, nullable=True),
    sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f('ck_jobs_status')),
    sa.CheckConstraint('progress >= 0 AND progress <= 1', name=op.f('ck_jobs_progress')),
    sa.ForeignKeyConstraint(['source_id'], ['sources.id'], name=op.f('fk_jobs_source_id_sources')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_index(op.f('ix_jobs_created_at_id'), 'jobs', ['created_at', 'id'], unique=False)
    op.create_index(op.f('ix_jobs_hardware_class_status'), 'jobs', ['hardware_class', 'status'], unique=False)
    op.create_index(op.f('ix_jobs_source_id'), 'jobs', ['source_id'], unique=False)
    op.create_index(op.f('ix_jobs_status_created_at'), 'jobs', ['status', 'created_at'], unique=False)

    op.create_table('job_targets',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('format', sa.String(length=50), nullable=False),
    sa.Column('quantization', sa.String(length=50), nullable=False),
    sa.Column('params', JSON_TYPE, nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('estimate', JSON_TYPE, nullable=True),
    sa.Column('error_code', sa.String(length=100), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('artifact_id', sa.String(length=40), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f('ck_job_targets_status')),
    sa.CheckConstraint('progress >= 0 AND progress <= 1', name=op.f('ck_job_targets_progress')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_targets_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_targets')),
    sa.UniqueConstraint('job_id', 'position', name=op.f('uq_job_targets_job_id_position'))
    )
    op.create_table('artifacts',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=True),
    sa.Column('target_id', sa.String(length=40), nullable=True),
    sa.Column('source_id', sa.String(length=40), nullable=False),
    sa.Column('format', sa.String(length=50), nullable=False),
    sa.Column('quantization', sa.String(length=50), nullable=False),
    sa.Column('filename', sa.String(length=500), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('storage_key', sa.Text(), nullable=False),
    sa.Column('metrics', JSON_TYPE, nullable=False),
    sa.Column('metadata', JSON_TYPE, nullable=False),
    sa.Column('engine_version', sa.String(length=100), nullable=False),
    sa.Column('recipe_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', UTC_DATETIME, nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_artifacts_job_id_jobs')),
    sa.ForeignKeyConstraint(['source_id'], ['sources.id'], name=op.f('fk_artifacts_source_id_sources')),
    sa.ForeignKeyConstraint(['target_id'], ['job_targets.id'], name=op.f('fk_artifacts_target_id_job_targets')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_artifacts'))
    )
    op.create_index(op.f('ix_artifacts_created_at_id'), 'artifacts', ['created_at', 'id'], unique=False)
    op.create_index(op.f('ix_artifacts_format_quantization'), 'artifacts', ['format', 'quantization'], unique=False)
    op.create_index(op.f('ix_artifacts_job_id'), 'artifacts', ['job_id'], unique=False)
    op.create_index(op.f('ix_artifacts_recipe_hash'), 'artifacts', ['recipe_hash'], unique=False)
    op.create_index(op.f('ix_artifacts_sha256'), 'artifacts', ['sha256'], unique=False)
    op.create_index(op.f('ix_artifacts_source_id'), 'artifacts', ['source_id'], unique=False)
    _audit_guard(install=True)


def downgrade() -> None:
    _audit_guard(install=False)
    op.drop_index(op.f('ix_artifacts_source_id'), table_name='artifacts')
    op.drop_index(op.f('ix_artifacts_sha256'), table_name='artifacts')
    op.drop_index(op.f('ix_artifacts_recipe_hash'), table_name='artifacts')
    op.drop_index(op.f('ix_artifacts_job_id'), table_name='artifacts')
    op.drop_index(op.f('ix_artifacts_format_quantization'), table_name='artifacts')
    op.drop_index(op.f('ix_artifacts_created_at_id'), table_name='artifacts')

    op.drop_table('artifacts')
    op.drop_table('job_targets')
    op.drop_index(op.f('ix_jobs_status_created_at'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_source_id'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_hardware_class_status'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_created_at_id'), table_name='jobs')

    op.drop_table('jobs')
    op.drop_index(op.f('ix_workers_hardware_class_last_heartbeat_at'), table_name='workers')

    op.drop_table('workers')
    op.drop_index(op.f('ix_sources_sha256'), table_name='sources')
    op.drop_index(op.f('ix_sources_created_at_id'), table_name='sources')

    op.drop_table('sources')
    op.drop_index(op.f('ix_lineage_edges_parent_type_parent_id'), table_name='lineage_edges')
    op.drop_index(op.f('ix_lineage_edges_child_type_child_id'), table_name='lineage_edges')

    op.drop_table('lineage_edges')
    op.drop_index(op.f('ix_audit_events_resource_type_resource_id'), table_name='audit_events')
    op.drop_index(op.f('ix_audit_events_at'), table_name='audit_events')

    op.drop_table('audit_events')
