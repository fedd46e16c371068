"""Migrations: apply from any directory, match the models, same on SQLite and Postgres."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from quantyard import catalog
from quantyard.catalog.db import current_revision, migrations_dir
from quantyard.catalog.models import Base

REPO = Path(__file__).resolve().parents[2]


def _head() -> str:
    """The newest revision, read from the migration scripts themselves."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(migrations_dir())).get_current_head()


def test_migrated_schema_matches_models(engine, catalog_url):
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    tables = set(inspect(engine).get_table_names())
    assert {"sources", "jobs", "job_targets", "artifacts", "lineage_edges", "audit_events", "workers"} <= tables
    assert current_revision(catalog_url) == _head()
    catalog.upgrade_database(catalog_url)  # idempotent


def test_list_indexes_exist(engine):
    insp = inspect(engine)
    job_ix = {tuple(ix["column_names"]) for ix in insp.get_indexes("jobs")}
    art_ix = {tuple(ix["column_names"]) for ix in insp.get_indexes("artifacts")}
    assert {("status", "created_at"), ("created_at", "id"), ("hardware_class", "status"), ("source_id",)} <= job_ix
    assert {("format", "quantization"), ("created_at", "id"), ("source_id",), ("sha256",)} <= art_ix


def test_upgrade_from_another_directory(tmp_path):
    db = tmp_path / "elsewhere" / "catalog.db"
    code = "import sys; from quantyard.catalog import upgrade_database; upgrade_database(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code, f"sqlite:///{db}"], cwd=tmp_path, env=env, check=True)
    assert current_revision(f"sqlite:///{db}") == _head()


def test_alembic_cli_from_repo_root(tmp_path):
    db = tmp_path / "cli.db"
    env = {**os.environ, "QUANTYARD_DATABASE_URL": f"sqlite:///{db}", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=REPO, env=env, check=True,
                   capture_output=True)
    assert current_revision(f"sqlite:///{db}") == _head()
    subprocess.run([sys.executable, "-m", "alembic", "downgrade", "base"], cwd=REPO, env=env, check=True,
                   capture_output=True)
    assert current_revision(f"sqlite:///{db}") is None


def test_migrations_dir_is_a_package():
    d = migrations_dir()
    assert (d / "__init__.py").is_file() and (d / "versions" / "__init__.py").is_file()
    assert (d / "script.py.mako").is_file()


def test_sqlite_pragmas(tmp_path):
    engine = catalog.make_engine(f"sqlite:///{tmp_path / 'sub' / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    engine.dispose()
    assert catalog.normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
