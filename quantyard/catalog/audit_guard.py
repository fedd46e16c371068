"""Whether the audit trail's protections are still in place: the append-only triggers and the grants.

The hash chain shows edits, deletions and insertions *inside* the chain; it cannot show events cut
off its tail after the newest anchor, and it says nothing about whether the database would refuse
the next tampering. So ``verify_audit_chain`` also checks, on the live catalog:

- **triggers** (migration 0001): on Postgres, enabled triggers on ``audit_events`` whose function
  raises must together refuse UPDATE, DELETE and TRUNCATE (``audit_events_no_update_delete``,
  ``audit_events_no_truncate``); on SQLite, ``audit_events_no_update`` and ``audit_events_no_delete``.
  A trigger that is dropped, disabled (``ALTER TABLE ... DISABLE TRIGGER``), set to fire only in
  replica mode, or whose function no longer raises is reported in ``triggers_missing``. The same
  for ``audit_pending``'s guard (migration 0009: ``audit_pending_guard``, ``audit_pending_no_truncate``).
- **grants** (Postgres; ``quantyard db grant-app-role``): no role but the table owner may UPDATE,
  DELETE or TRUNCATE ``audit_events`` through a grant (PUBLIC included), and the application's
  role — given, configured (``QUANTYARD_DB_APP_ROLE``), or the verifying connection's own user
  when that is not the owner — must have none of those privileges by any route (ownership,
  membership, superuser). Problems go to ``grants_unsafe``.

What it cannot see: a superuser who turned the triggers off for one transaction
(``session_replication_role = replica``) and put everything back; that is what the chain and the
anchors are for.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

TABLE = "audit_events"
GUARDED_OPS = ("UPDATE", "DELETE", "TRUNCATE")
# The triggers migration 0001 installs, and what each refuses (named in reports).
PG_TRIGGERS = {"audit_events_no_update_delete": ("UPDATE", "DELETE"), "audit_events_no_truncate": ("TRUNCATE",)}
# Events waiting to be chained (deferred chaining, migration 0009) have their own guard.
PENDING_TABLE = "audit_pending"
PG_PENDING_TRIGGERS = {"audit_pending_guard": ("UPDATE", "DELETE"), "audit_pending_no_truncate": ("TRUNCATE",)}
SQLITE_TRIGGERS = {"audit_events_no_update": "UPDATE", "audit_events_no_delete": "DELETE"}

# pg_trigger.tgtype bits (src/include/catalog/pg_trigger.h)
_TG_BEFORE, _TG_DELETE, _TG_UPDATE, _TG_TRUNCATE = 1 << 1, 1 << 3, 1 << 4, 1 << 5
_TG_OPS = {"DELETE": _TG_DELETE, "UPDATE": _TG_UPDATE, "TRUNCATE": _TG_TRUNCATE}


@dataclass(frozen=True)
class Protection:
    triggers_missing: tuple[str, ...] = ()
    grants_unsafe: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.triggers_missing and not self.grants_unsafe

    def summary(self) -> str:
        parts = []
        if self.triggers_missing:
            parts.append("append-only triggers missing: " + "; ".join(self.triggers_missing))
        if self.grants_unsafe:
            parts.append("unsafe grants: " + "; ".join(self.grants_unsafe))
        return ". ".join(parts)


def check_protection(s: Session, *, app_role: str | None = None) -> Protection:
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        triggers = _pg_trigger_problems(s, TABLE, PG_TRIGGERS)
        if s.execute(text("SELECT to_regclass(:t)"), {"t": PENDING_TABLE}).scalar() is not None:
            triggers += _pg_trigger_problems(s, PENDING_TABLE, PG_PENDING_TRIGGERS)
        return Protection(tuple(triggers), tuple(_pg_grant_problems(s, app_role)))
    if dialect == "sqlite":
        return Protection(tuple(_sqlite_trigger_problems(s)))
    return Protection()


def _pg_trigger_problems(s: Session, table: str, expected: dict[str, tuple[str, ...]]) -> list[str]:
    rows = s.execute(text(
        "SELECT t.tgname, t.tgenabled, t.tgtype, p.proname, p.prosrc FROM pg_trigger t "
        "JOIN pg_proc p ON p.oid = t.tgfoid WHERE t.tgrelid = to_regclass(:t) AND NOT t.tgisinternal"),
        {"t": table}).all()
    covered: set[str] = set()
    notes: dict[str, str] = {}
    for name, enabled, tgtype, proname, prosrc in rows:
        ops = {op for op, bit in _TG_OPS.items() if tgtype & bit}
        if not tgtype & _TG_BEFORE or not ops:
            continue
        enabled = enabled.decode() if isinstance(enabled, bytes) else str(enabled)
        if enabled not in ("O", "A"):  # D: disabled; R: fires only in replica mode
            notes[name] = "disabled" if enabled == "D" else "fires only in replica mode"
        elif "RAISE" not in (prosrc or "").upper():
            notes[name] = f"its function {proname}() no longer raises"
        else:
            covered |= ops
    problems = []
    for name, wanted in expected.items():
        uncovered = [op for op in wanted if op not in covered]
        if uncovered:
            problems.append(f"{name} ({', '.join(uncovered)} not refused): {notes.get(name, 'missing')}")
    return problems


def _pg_grant_problems(s: Session, app_role: str | None) -> list[str]:
    owner = s.execute(text("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = to_regclass(:t)"),
                      {"t": TABLE}).scalar()
    if owner is None:
        return [f"no {TABLE} table"]
    granted = s.execute(text(
        "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type "
        "FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = to_regclass(:t) AND a.grantee <> c.relowner "
        "AND a.privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE') ORDER BY 1, 2"), {"t": TABLE}).all()
    by_role: dict[str, list[str]] = {}
    for grantee, privilege in granted:
        by_role.setdefault(grantee, []).append(privilege)
    problems = [f"{role} is granted {', '.join(privs)} on {TABLE}" for role, privs in by_role.items()]
    role = app_role or _connection_role_if_not_owner(s, owner)
    if role is not None and role not in by_role:
        problems += _app_role_problems(s, role, owner)
    return problems


def _connection_role_if_not_owner(s: Session, owner: str) -> str | None:
    """The verifying connection's own user, when it is not the owner: most likely the app's role."""
    user = s.execute(text("SELECT current_user")).scalar()
    return None if user == owner else user


def _app_role_problems(s: Session, role: str, owner: str) -> list[str]:
    row = s.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
    if row is None:
        return [f"the app role {role!r} does not exist"]
    may = [op for op in GUARDED_OPS
           if s.execute(text("SELECT has_table_privilege(:r, :t, :p)"), {"r": role, "t": TABLE, "p": op}).scalar()]
    if not may:
        return []
    why = ("a superuser" if row.rolsuper else f"the owner of {TABLE} (or a member of {owner!r})"
           if s.execute(text("SELECT pg_has_role(:r, :o, 'MEMBER')"), {"r": role, "o": owner}).scalar()
           else "granted them")
    return [f"the app role {role} may {', '.join(may)} {TABLE} ({why}): run `quantyard db grant-app-role {role}` "
            "with a role that owns nothing"]


def _sqlite_trigger_problems(s: Session) -> list[str]:
    rows: dict[str, str] = dict(s.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = :t"),
                          {"t": TABLE}).all())
    problems = []
    for name, op in SQLITE_TRIGGERS.items():
        sql = rows.get(name)
        if sql is None:
            problems.append(f"{name} ({op} not refused): missing")
        elif "RAISE" not in sql.upper():
            problems.append(f"{name} ({op} not refused): it no longer raises")
    return problems


__all__ = ["GUARDED_OPS", "PG_PENDING_TRIGGERS", "PG_TRIGGERS", "Protection", "SQLITE_TRIGGERS", "check_protection"]
