"""Alembic environment for the catalog.

The database URL comes from (first found): ``config.attributes["database_url"]`` (set by
``quantyard.catalog.upgrade_database``), ``sqlalchemy.url`` in alembic.ini, or the settings
(``QUANTYARD_DATABASE_URL``, else the embedded SQLite catalog).
"""

from __future__ import annotations

from alembic import context

from quantyard.catalog.db import make_engine, normalize_url
from quantyard.catalog.models import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from quantyard.settings import get_settings

        url = get_settings().resolved_database_url
    return normalize_url(url)


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
