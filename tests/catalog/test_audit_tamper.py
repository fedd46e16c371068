"""Tampering with the audit trail on Postgres, as a superuser would, and what catches it.

Real events are written through the catalog functions; then superuser SQL (with the append-only
triggers off for that one transaction: ``SET LOCAL session_replication_role = replica``) edits,
deletes, inserts, renumbers or swaps records. ``verify_audit_chain`` and ``quantyard audit verify``
must name the first broken record (seq and id) and what is wrong with it. A chain rewritten so
that it is consistent again is caught by the anchors in the object store. The application's own
role (``quantyard db grant-app-role``) cannot change audit rows at all.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from quantyard import catalog
from quantyard.catalog import AuditEvent
from quantyard.catalog.anchor import (
    anchor_if_due,
    read_anchors,
    verify_with_anchors,
    write_anchor,
)
from quantyard.catalog.audit import event_hash
from quantyard.catalog.models import hashed_fields, utcnow
from quantyard.cli import main
from quantyard.settings import get_settings
from quantyard.storage import open_store
from tests.fixtures.services import _pg_admin_connect

pytestmark = pytest.mark.parametrize("catalog_url", ["postgres"], indirect=True)

REQ = catalog.RequestInfo("req-t", "192.0.2.7", "pytest-tamper")


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture
def chain(factory) -> list[dict]:
    """Ten real events: source, 4 jobs, 2 cancels, a claim, a finish, an admin note."""
    with factory.begin() as s:
        src = catalog.create_source(s, name="m", sha256="e" * 64, size_bytes=1, uri="file:///x/m.tar",
                                    storage_key="sources/e/m.tar", metadata={}, actor="key:alice", request=REQ)
    jobs = []
    for i in range(4):
        with factory.begin() as s:
            jobs.append(catalog.create_job(s, source_id=src.id, targets=["gguf:Q8_0"], labels={"n": str(i)},
                                           actor="key:alice", request=REQ).id)
    for job_id in jobs[:2]:
        with factory.begin() as s:
            catalog.request_cancel(s, job_id=job_id, actor="key:bob", request=REQ)
    with factory.begin() as s:
        catalog.claim_job(s, job_id=jobs[2], worker_id="w1", lease_s=60, max_attempts=3)
    with factory.begin() as s:
        catalog.finish_job(s, job_id=jobs[2], status="failed", error_code="x", error_message="boom", actor="worker:w1")
    with factory.begin() as s:
        catalog.record_audit(s, actor="key:älice", action="note", resource_type="test", resource_id=None,
                             details={"text": "ünïcödé ✓", "n": [1, 2.5, None]})
    rows = events(factory)
    assert len(rows) == 10 and catalog_ok(factory)
    return rows


def events(factory) -> list[dict]:
    with factory() as s:
        return [dict(r) for r in s.execute(select(AuditEvent.__table__).order_by(AuditEvent.seq)).mappings()]


def catalog_ok(factory) -> bool:
    with factory() as s:
        return catalog.verify_audit_chain(s).ok


def tamper(engine, *statements: str, **params) -> None:
    """Superuser SQL with the append-only triggers off for this one transaction."""
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        for statement in statements:
            conn.execute(text(statement), params)


def verify(factory, **kw) -> catalog.AuditVerification:
    with factory() as s:
        return catalog.verify_audit_chain(s, **kw)


def run_cli(args: list[str], url: str, tmp_path, **env) -> tuple[int, str]:
    """`quantyard ARGS` against this catalog; (exit code, stdout + stderr)."""
    get_settings.cache_clear()
    try:
        r = CliRunner().invoke(main, args, env={"QUANTYARD_DATABASE_URL": url, "QUANTYARD_DATA_DIR": str(tmp_path),
                                                **env}, catch_exceptions=False)
    finally:
        get_settings.cache_clear()
    return r.exit_code, r.stdout + r.stderr


def assert_reported(result, factory, catalog_url, tmp_path, *, problem, seq, event_id, checked=None):
    """verify() and `quantyard audit verify --json` both name exactly this record."""
    assert not result.ok
    assert (result.problem, result.first_bad_seq, result.first_bad_id) == (problem, seq, event_id), result
    if checked is not None:
        assert result.checked == checked
    code, out = run_cli(["audit", "verify", "--json"], catalog_url, tmp_path)
    assert code == 1 and json.loads(out) == result.to_dict()
    code, out = run_cli(["audit", "verify"], catalog_url, tmp_path)
    assert code == 1 and f"BROKEN at seq {seq} (id {event_id}): {problem}" in out


def shift_up(engine, from_seq: int, *extra: str, **params) -> None:
    """Renumber seq >= from_seq by +1 (through negative seqs: the primary key is checked per row)."""
    tamper(engine, "UPDATE audit_events SET seq = -seq WHERE seq >= :f",
           "UPDATE audit_events SET seq = -seq + 1 WHERE seq < 0", *extra, f=from_seq, **params)


def forged_from(template: dict, **changes) -> dict:
    fields = {**hashed_fields(template), "id": f"aud_forged_{uuid.uuid4().hex[:8]}", "actor": "key:mallory",
              "details": {"forged": True}, **changes}
    return {**fields, "hash": event_hash(fields)}


def insert(factory, row: dict) -> None:
    with factory.begin() as s:
        s.execute(AuditEvent.__table__.insert().values(row))


# --------------------------------------------------------------------------------- the chain itself


def test_intact_chain_verifies_in_cli(factory, catalog_url, chain, tmp_path):
    result = verify(factory)
    assert result.ok and result.checked == 10 and result.head_seq == 10 and result.head_hash == chain[-1]["hash"]
    code, out = run_cli(["audit", "verify"], catalog_url, tmp_path)
    assert code == 0 and "audit chain ok: 10 event(s), head seq 10" in out


@pytest.mark.parametrize("column, value", [
    ("actor", "'key:mallory'"),
    ("outcome", "'failure'"),
    ("at", "at + interval '1 second'"),
    ("details", "details || '{\"to\": \"running\"}'::jsonb"),
    ("source_ip", "NULL"),
])
def test_edited_field_is_reported_at_its_record(factory, engine, catalog_url, chain, tmp_path, column, value):
    tamper(engine, f"UPDATE audit_events SET {column} = {value} WHERE seq = 6")
    assert_reported(verify(factory), factory, catalog_url, tmp_path, problem="edited", seq=6,
                    event_id=chain[5]["id"], checked=5)


def test_deleted_record_is_reported_as_a_gap(factory, engine, catalog_url, chain, tmp_path):
    tamper(engine, "DELETE FROM audit_events WHERE seq = 5")
    result = verify(factory)
    assert_reported(result, factory, catalog_url, tmp_path, problem="missing", seq=6, event_id=chain[5]["id"],
                    checked=4)
    assert "seq 5 missing" in result.reason


def test_deleted_and_renumbered_is_reported_as_moved(factory, engine, catalog_url, chain, tmp_path):
    # Hide the gap: everything after the deleted record moves down one seq.
    tamper(engine, "DELETE FROM audit_events WHERE seq = 5",
           "UPDATE audit_events SET seq = -seq WHERE seq > 5", "UPDATE audit_events SET seq = -seq - 1 WHERE seq < 0")
    result = verify(factory)
    assert_reported(result, factory, catalog_url, tmp_path, problem="reordered", seq=5, event_id=chain[5]["id"],
                    checked=4)
    assert "written as seq 6" in result.reason


def test_forged_record_with_its_own_valid_hash_is_reported(factory, catalog_url, chain, tmp_path):
    # Appended at the head with a correct hash of its own contents, but not chained to the head.
    forged = forged_from(chain[-1], seq=11, prev_hash="ab" * 32)
    insert(factory, {**forged, "at": chain[-1]["at"]})
    result = verify(factory)
    assert_reported(result, factory, catalog_url, tmp_path, problem="inserted", seq=11, event_id=forged["id"],
                    checked=10)
    assert "prev_hash" in result.reason


def test_forged_record_chained_into_the_middle_is_reported(factory, engine, catalog_url, chain, tmp_path):
    # The forger drops the UNIQUE(prev_hash) guard, makes room at seq 5 and chains a record onto
    # seq 4 correctly: only the next link (old seq 5 still points at seq 4) gives it away.
    forged = forged_from(chain[4], seq=5, prev_hash=chain[3]["hash"])
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_events DROP CONSTRAINT uq_audit_events_prev_hash"))
    shift_up(engine, 5)
    insert(factory, {**forged, "at": chain[4]["at"]})
    result = verify(factory)
    assert_reported(result, factory, catalog_url, tmp_path, problem="inserted", seq=5, event_id=forged["id"],
                    checked=4)


@pytest.mark.parametrize("id_prefix", ["aud_0", "aud_z"])  # sorts before / after the genuine record
def test_forged_record_with_a_seq_collision_is_reported(factory, engine, catalog_url, chain, tmp_path, id_prefix):
    # Chained correctly onto seq 4 and claiming seq 5, which the genuine record holds (a fork);
    # storing it takes dropping the primary key and the UNIQUE(prev_hash) guard.
    forged = forged_from(chain[4], seq=5, prev_hash=chain[3]["hash"], id=f"{id_prefix}forged_{uuid.uuid4().hex[:8]}")
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_events DROP CONSTRAINT pk_audit_events, "
                          "DROP CONSTRAINT uq_audit_events_prev_hash"))
    insert(factory, {**forged, "at": chain[4]["at"]})
    result = verify(factory)
    assert_reported(result, factory, catalog_url, tmp_path, problem="duplicate", seq=5, event_id=forged["id"],
                    checked=4)
    assert chain[4]["id"] in result.reason


def test_swapped_records_are_reported_at_the_first(factory, engine, catalog_url, chain, tmp_path):
    tamper(engine, "UPDATE audit_events SET seq = -1 WHERE seq = 3", "UPDATE audit_events SET seq = 3 WHERE seq = 7",
           "UPDATE audit_events SET seq = 7 WHERE seq = -1")
    result = verify(factory)
    assert_reported(result, factory, catalog_url, tmp_path, problem="reordered", seq=3, event_id=chain[6]["id"],
                    checked=2)
    assert "written as seq 7" in result.reason


def test_swapped_contents_are_reported_at_the_first(factory, engine, catalog_url, chain, tmp_path):
    # Seq, prev_hash and hash stay in place; what the two records say is exchanged.
    cols = ("at", "actor", "action", "resource_type", "resource_id", "outcome", "request_id", "source_ip",
            "user_agent", "details")
    tamper(engine, "UPDATE audit_events a SET " + ", ".join(f"{c} = b.{c}" for c in cols)
           + " FROM audit_events b WHERE (a.seq = 3 AND b.seq = 8) OR (a.seq = 8 AND b.seq = 3)")
    after = events(factory)
    assert (after[2]["action"], after[7]["action"]) == (chain[7]["action"], chain[2]["action"])
    assert_reported(verify(factory), factory, catalog_url, tmp_path, problem="edited", seq=3,
                    event_id=chain[2]["id"], checked=2)


# ----------------------------------------------------------------------------------------- anchors


def rewrite_consistently(factory, engine, chain: list[dict], from_seq: int) -> None:
    """Edit one record and recompute every hash after it: the chain verifies again on its own."""
    prev = chain[from_seq - 2]["hash"]
    statements, params = [], {}
    for row in chain[from_seq - 1:]:
        fields = {**hashed_fields(row), "prev_hash": prev}
        if row["seq"] == from_seq:
            fields["actor"] = "key:mallory"
        new_hash = event_hash(fields)
        n = row["seq"]
        statements.append(f"UPDATE audit_events SET actor = :a{n}, prev_hash = :p{n}, hash = :h{n} WHERE seq = {n}")
        params.update({f"a{n}": fields["actor"], f"p{n}": prev, f"h{n}": new_hash})
        prev = new_hash
    with engine.begin() as conn:  # UNIQUE(prev_hash) would trip over the intermediate states
        conn.execute(text("ALTER TABLE audit_events DROP CONSTRAINT uq_audit_events_prev_hash"))
    tamper(engine, *statements, **params)


def test_consistent_rewrite_is_caught_by_the_anchors(factory, engine, catalog_url, chain, tmp_path):
    store = open_store(f"file://{tmp_path / 'objects'}")
    early = chain[:3]
    with factory.begin() as s:
        anchor = write_anchor(s, store)  # anchors seq 10, and is event 11
    assert anchor["seq"] == 10 and anchor["hash"] == chain[-1]["hash"] and anchor["count"] == 10
    assert anchor["retention"] == "unsupported" and anchor["key"].startswith("audit-anchors/")
    assert anchor["key"].endswith("-10.json")
    with factory() as s:
        assert verify_with_anchors(s, store).ok
    rewrite_consistently(factory, engine, events(factory), from_seq=4)
    assert verify(factory).ok  # internally consistent again...
    with factory() as s:
        result = verify_with_anchors(s, store)  # ...but not with what was anchored
    assert (result.ok, result.problem, result.first_bad_seq) == (False, "rewritten", 10)
    assert anchor["key"] in result.reason and "between seq 1 and seq 10" in result.reason
    assert [e["id"] for e in early] == [e["id"] for e in events(factory)[:3]]
    code, out = run_cli(["audit", "verify", "--anchors", "--json"], catalog_url, tmp_path,
                        QUANTYARD_STORAGE_URL=f"file://{tmp_path / 'objects'}")
    assert code == 1 and json.loads(out) == result.to_dict()


def test_truncated_tail_is_caught_by_the_anchors(factory, engine, catalog_url, chain, tmp_path):
    store = open_store(f"file://{tmp_path / 'objects'}")
    with factory.begin() as s:
        write_anchor(s, store)
    tamper(engine, "DELETE FROM audit_events WHERE seq >= 8")
    assert verify(factory).ok  # a shorter chain is still a chain
    with factory() as s:
        result = verify_with_anchors(s, store)
    assert (result.ok, result.problem, result.first_bad_seq, result.checked) == (False, "truncated", 8, 7)


def test_anchor_cli_and_periodic_anchor(factory, catalog_url, chain, tmp_path):
    env = {"QUANTYARD_STORAGE_URL": f"file://{tmp_path / 'objects'}"}
    code, out = run_cli(["audit", "anchor", "--json"], catalog_url, tmp_path, **env)
    assert code == 0 and json.loads(out)["seq"] == 10
    store = open_store(env["QUANTYARD_STORAGE_URL"])
    t0 = utcnow()
    # The head is the anchor's own event: nothing new to anchor, however late it is.
    assert anchor_if_due(factory, store, interval_s=60, now=t0 + timedelta(hours=2)) is None
    with factory.begin() as s:
        catalog.record_audit(s, actor="key:x", action="note", resource_type="test", resource_id=None)
    assert anchor_if_due(factory, store, interval_s=3600, now=t0) is None  # not due yet
    due = anchor_if_due(factory, store, interval_s=3600, now=t0 + timedelta(hours=2))
    assert due is not None and due["seq"] == 12
    assert [a["seq"] for a in read_anchors(store)] == [10, 12]
    code, out = run_cli(["audit", "verify", "--anchors"], catalog_url, tmp_path, **env)
    assert code == 0 and "13 event(s)" in out and "2 anchor(s) match" in out


def test_anchor_with_object_lock_on_seaweedfs(factory, catalog_url, chain, tmp_path, s3_server):
    client = s3_server.client()
    bucket = f"locked-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    env = {**s3_server.env, "QUANTYARD_STORAGE_URL": f"s3://{bucket}/qy"}
    code, out = run_cli(["audit", "anchor", "--json", "--retention-days", "2"], catalog_url, tmp_path, **env)
    anchor = json.loads(out)
    assert code == 0 and anchor["retention"]["mode"] == "COMPLIANCE", out
    head = client.head_object(Bucket=bucket, Key=f"qy/{anchor['key']}")
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert abs((head["ObjectLockRetainUntilDate"] - utcnow()).total_seconds() - 2 * 86400) < 120
    with pytest.raises(Exception, match="AccessDenied|Access Denied"):  # not even by the store's admin key
        client.delete_object(Bucket=bucket, Key=f"qy/{anchor['key']}", VersionId=head["VersionId"])
    # Overwriting the anchor only adds a version; every version is read back and checked.
    forged = {**anchor, "hash": "0" * 64}
    client.put_object(Bucket=bucket, Key=f"qy/{anchor['key']}", Body=json.dumps(forged).encode())
    store = open_store(f"s3://{bucket}/qy", endpoint_url=s3_server.endpoint_url, region=s3_server.region,
                       access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    assert sorted(a["hash"][:4] for a in read_anchors(store)) == sorted(["0000", anchor["hash"][:4]])
    with factory() as s:
        result = verify_with_anchors(s, store)
    assert not result.ok and result.problem == "rewritten" and "overwritten" in result.reason
    # A bucket without Object Lock says so in the anchor.
    plain = s3_server.open_store()
    with factory.begin() as s:
        assert write_anchor(s, plain)["retention"] == "unsupported"


# ------------------------------------------------------------------------- the application's role


@contextlib.contextmanager
def app_role(catalog_url: str, tmp_path, *, grant: bool = True) -> Iterator[str]:
    """A fresh non-superuser role with the app's rights (`quantyard db grant-app-role`); yields a
    URL of the catalog that logs in as it (the test server trusts local connections)."""
    role = f"quantyard_app_{uuid.uuid4().hex[:8]}"
    if grant:
        code, out = run_cli(["db", "grant-app-role", role, "--create"], catalog_url, tmp_path)
        assert code == 0 and "REVOKE UPDATE, DELETE, TRUNCATE" in out, out
    url = make_url(catalog_url).set(username=role, password=None).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with _pg_admin_connect() as conn:
            conn.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
        import psycopg

        with psycopg.connect(make_url(catalog_url).set(drivername="postgresql").render_as_string(
                hide_password=False), autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
        with _pg_admin_connect() as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_app_role_cannot_change_audit_rows(catalog_url, chain, tmp_path):
    with app_role(catalog_url, tmp_path) as url:
        engine = catalog.make_engine(url)
        try:
            factory = catalog.make_session_factory(engine)
            with factory.begin() as s:  # the app's own work goes through, audited
                job_id = s.execute(text("SELECT id FROM jobs WHERE status = 'queued' LIMIT 1")).scalar_one()
                catalog.request_cancel(s, job_id=job_id, actor="key:app", request=REQ)
            refused = {
                "UPDATE audit_events SET actor = 'x' WHERE seq = 1": "permission denied",
                "DELETE FROM audit_events WHERE seq = 1": "permission denied",
                "TRUNCATE audit_events": "permission denied",
                "ALTER TABLE audit_events DISABLE TRIGGER USER": "must be owner",
                "SET session_replication_role = replica": "permission denied",
                "DROP TABLE audit_events": "must be owner",
                "UPDATE alembic_version SET version_num = 'x'": "permission denied",
            }
            for statement, message in refused.items():
                with pytest.raises(DBAPIError, match=message), engine.begin() as conn:
                    conn.execute(text(statement))
            with factory() as s:
                result = catalog.verify_audit_chain(s)
                assert result.ok and result.checked == 11
        finally:
            engine.dispose()


def test_tables_of_later_migrations_need_no_second_grant(catalog_url, chain, tmp_path):
    """Default privileges: a table the owner creates after the grant (a later `db upgrade`) is
    usable by the app role at once, while the audit table stays append-only."""
    table = f"later_{uuid.uuid4().hex[:6]}"
    with app_role(catalog_url, tmp_path) as url:
        owner = catalog.make_engine(catalog_url)
        with owner.begin() as conn:
            conn.execute(text(f"CREATE TABLE {table} (id serial PRIMARY KEY, note text)"))
        owner.dispose()
        engine = catalog.make_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(text(f"INSERT INTO {table} (note) VALUES ('a')"))  # the sequence too
                conn.execute(text(f"UPDATE {table} SET note = 'b'"))
                assert conn.execute(text(f"SELECT note FROM {table}")).scalar_one() == "b"
            with pytest.raises(DBAPIError, match="permission denied"), engine.begin() as conn:
                conn.execute(text("DELETE FROM audit_events WHERE seq = 1"))
        finally:
            engine.dispose()


def test_grant_app_role_refuses_superusers_and_owners(catalog_url, chain, tmp_path):
    code, out = run_cli(["db", "grant-app-role", "postgres"], catalog_url, tmp_path)
    assert code == 1 and "is a superuser" in out
    code, out = run_cli(["db", "grant-app-role", f"nobody_{uuid.uuid4().hex[:6]}"], catalog_url, tmp_path)
    assert code == 1 and "does not exist" in out
    owner_like = f"quantyard_owner_{uuid.uuid4().hex[:6]}"  # a member of the tables' owner
    with _pg_admin_connect() as conn:
        conn.execute(f'CREATE ROLE "{owner_like}" LOGIN')
        conn.execute(f'GRANT postgres TO "{owner_like}"')
    try:
        code, out = run_cli(["db", "grant-app-role", owner_like], catalog_url, tmp_path)
        assert code == 1 and "owns the catalog tables" in out
    finally:
        with _pg_admin_connect() as conn:
            conn.execute(f'DROP ROLE "{owner_like}"')
