"""The application's own Postgres role: full rights on the catalog, append-only on the audit trail.

Migrations run as the schema owner; the API and workers should connect as a separate role that
does not own the tables (an owner can disable triggers and grant itself anything). Applied by
``quantyard db grant-app-role ROLE`` (idempotent). What it runs, for ROLE in the catalog's schema
and OWNER the role owning the catalog tables (the one migrations run as)::

    GRANT USAGE ON SCHEMA <schema> TO ROLE;
    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA <schema> TO ROLE;
    GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA <schema> TO ROLE;
    REVOKE UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON audit_events FROM ROLE;   -- SELECT, INSERT only
    REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON alembic_version FROM ROLE;              -- read only
    ALTER DEFAULT PRIVILEGES FOR ROLE OWNER IN SCHEMA <schema>
        GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO ROLE;                        -- and sequences

The default privileges give tables that later migrations create the same rights, so an upgrade
needs no second grant. (A future append-only table would have to revoke them in its migration,
as audit_events' rights are revoked here.)

With these rights the role cannot UPDATE, DELETE or TRUNCATE audit rows (permission denied), and
the append-only triggers of migration 0001 refuse them for everyone else who is not allowed to
disable triggers. ``--create`` makes the role first (LOGIN, no superuser, no password: set one
with ``ALTER ROLE ... PASSWORD`` or use your usual authentication).
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Engine

APPEND_ONLY_TABLE = "audit_events"


class RoleError(Exception):
    pass


def _ident(conn, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(name)


def app_role_statements(conn, role: str, schema: str, owner: str) -> list[str]:
    r, sch, own = _ident(conn, role), _ident(conn, schema), _ident(conn, owner)
    return [
        f"GRANT USAGE ON SCHEMA {sch} TO {r}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {sch} TO {r}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {sch} TO {r}",
        f"REVOKE UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON {sch}.{APPEND_ONLY_TABLE} FROM {r}",
        f"GRANT SELECT, INSERT ON {sch}.{APPEND_ONLY_TABLE} TO {r}",
        f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {sch}.alembic_version FROM {r}",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {own} IN SCHEMA {sch} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {r}",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {own} IN SCHEMA {sch} GRANT USAGE, SELECT ON SEQUENCES TO {r}",
    ]


def _check_role(conn, role: str, schema: str, *, create: bool) -> str:
    """Checks (or creates) the role; returns the owner of the catalog tables."""
    owner = conn.execute(text(
        "SELECT pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = :s AND c.relname = :t"), {"s": schema, "t": APPEND_ONLY_TABLE}).scalar()
    if owner is None:
        raise RoleError(f"no {APPEND_ONLY_TABLE} table in schema {schema!r}: run `quantyard db upgrade` first")
    row = conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
    if row is None:
        if not create:
            raise RoleError(f"role {role!r} does not exist (pass --create, or CREATE ROLE it first)")
        conn.execute(text(f"CREATE ROLE {_ident(conn, role)} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"))
        return owner
    if row.rolsuper:
        raise RoleError(f"role {role!r} is a superuser: it would bypass every privilege; use a plain role")
    member = conn.execute(text("SELECT pg_has_role(:r, :o, 'MEMBER')"), {"r": role, "o": owner}).scalar()
    if member:
        raise RoleError(f"role {role!r} owns the catalog tables (or is a member of their owner {owner!r}); "
                        "an owner can disable the audit triggers: use a role that owns nothing")
    return owner


def grant_app_role(engine: Engine, role: str, *, create: bool = False) -> list[str]:
    """Create (optionally) and grant ``role`` the application's rights; returns the statements run."""
    if engine.dialect.name != "postgresql":
        raise RoleError(f"database roles are a Postgres feature; this catalog is {engine.dialect.name}")
    with engine.begin() as conn:
        schema = conn.execute(text("SELECT current_schema()")).scalar_one()
        owner = _check_role(conn, role, schema, create=create)
        statements = app_role_statements(conn, role, schema, owner)
        for statement in statements:
            conn.execute(text(statement))
    return statements
