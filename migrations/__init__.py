"""Alembic migrations of the Quantyard catalog (run with `quantyard db upgrade` or
`alembic upgrade head` from the repository root; programmatic: quantyard.catalog.upgrade_database)."""
