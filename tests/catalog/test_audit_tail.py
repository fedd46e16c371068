"""The audit chain's tail: anchors written at shutdown and every N events, and `verify` noticing
that the database's protections (append-only triggers, grants) are gone.

The attack of issue 10: a database owner drops the triggers and deletes the newest events. The
chain alone cannot see a cut tail (a shorter chain is still a chain), but the dropped triggers
are reported at once, and the anchor written at shutdown (or after N events) still names the
deleted head, so ``--anchors`` reports the truncation too.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from quantyard import catalog
from quantyard.catalog.anchor import anchor_if_due, anchor_on_shutdown, read_anchors, verify_with_anchors
from quantyard.storage import open_store
from tests.catalog.test_audit_tamper import REQ, app_role, chain, events, run_cli  # noqa: F401 (fixture)

# What migration 0001 installs, written out here as the oracle (not read from audit_guard.py).
PG_TRIGGERS = ("audit_events_no_update_delete", "audit_events_no_truncate")
SQLITE_TRIGGERS = ("audit_events_no_update", "audit_events_no_delete")

postgres_only = pytest.mark.parametrize("catalog_url", ["postgres"], indirect=True)


def store_for(tmp_path):
    return open_store(f"file://{tmp_path / 'objects'}")


def note(factory, n: int) -> None:
    for i in range(n):
        with factory.begin() as s:
            catalog.record_audit(s, actor="key:x", action="note", resource_type="test", resource_id=str(i))


def cli_verify(catalog_url, tmp_path, *extra) -> tuple[int, dict, str]:
    env = {"QUANTYARD_STORAGE_URL": f"file://{tmp_path / 'objects'}"}
    code, out = run_cli(["audit", "verify", "--json", *extra], catalog_url, tmp_path, **env)
    _, text_out = run_cli(["audit", "verify", *extra], catalog_url, tmp_path, **env)
    return code, json.loads(out), text_out


def test_dropped_triggers_and_a_cut_tail_are_both_reported(factory, engine, catalog_url, chain, tmp_path):  # noqa: F811 (the fixture)
    store = store_for(tmp_path)
    assert anchor_on_shutdown(factory, store)["seq"] == 10  # what a stopping API or worker writes
    assert anchor_on_shutdown(factory, store) is None  # nothing new since: no second anchor
    note(factory, 3)  # seqs 12..14, then the owner strikes
    assert anchor_on_shutdown(factory, store)["seq"] == 14
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as conn:
        for name in PG_TRIGGERS if postgres else SQLITE_TRIGGERS:
            conn.execute(text(f"DROP TRIGGER {name}" + (" ON audit_events" if postgres else "")))
        conn.execute(text("DELETE FROM audit_events WHERE seq >= 12"))  # the triggers no longer refuse

    with factory() as s:
        plain = catalog.verify_audit_chain(s)
        anchored = verify_with_anchors(s, store)
    expected = PG_TRIGGERS if postgres else SQLITE_TRIGGERS
    # Without anchors the chain itself verifies (11 events), but the missing triggers fail it.
    assert (plain.ok, plain.problem, plain.checked) == (False, "triggers_missing", 11)
    assert [m.split(" ")[0] for m in plain.triggers_missing] == list(expected)
    assert all("missing" in m for m in plain.triggers_missing)
    # With anchors: the anchor of seq 14 names events that are gone, and the triggers still show.
    assert (anchored.ok, anchored.problem, anchored.first_bad_seq) == (False, "truncated", 12)
    assert [m.split(" ")[0] for m in anchored.triggers_missing] == list(expected)
    assert "12..14 were deleted" in anchored.reason and expected[0] in anchored.reason

    code, data, out = cli_verify(catalog_url, tmp_path)
    assert code == 1 and data["problem"] == "triggers_missing" and len(data["triggers_missing"]) == 2
    assert "UNPROTECTED" in out and all(name in out for name in expected)
    code, data, out = cli_verify(catalog_url, tmp_path, "--anchors")
    assert code == 1 and data["problem"] == "truncated" and len(data["triggers_missing"]) == 2
    assert "BROKEN at seq 12" in out and expected[0] in out


@postgres_only
def test_disabled_trigger_and_unsafe_grants_are_reported(factory, engine, catalog_url, chain, tmp_path):  # noqa: F811 (the fixture)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_truncate"))
    with factory() as s:
        result = catalog.verify_audit_chain(s)
    assert (result.ok, result.problem) == (False, "triggers_missing")
    assert result.triggers_missing == ("audit_events_no_truncate (TRUNCATE not refused): disabled",)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_truncate"))
        conn.execute(text("GRANT DELETE, TRUNCATE ON audit_events TO PUBLIC"))
    code, data, out = cli_verify(catalog_url, tmp_path)
    assert code == 1 and data["problem"] == "grants_unsafe" and data["triggers_missing"] == []
    assert data["grants_unsafe"] == ["PUBLIC is granted DELETE, TRUNCATE on audit_events"]
    with engine.begin() as conn:
        conn.execute(text("REVOKE DELETE, TRUNCATE ON audit_events FROM PUBLIC"))
    code, data, _ = cli_verify(catalog_url, tmp_path)
    assert code == 0 and data["ok"] and data["grants_unsafe"] == []
    with engine.begin() as conn:  # the guard of the events waiting to be chained counts too
        conn.execute(text("DROP TRIGGER audit_pending_guard ON audit_pending"))
    code, data, _ = cli_verify(catalog_url, tmp_path)
    assert code == 1 and data["triggers_missing"] == ["audit_pending_guard (UPDATE, DELETE not refused): missing"]


@postgres_only
def test_the_app_role_is_checked(factory, catalog_url, chain, tmp_path):  # noqa: F811 (the fixture)
    with app_role(catalog_url, tmp_path) as url:  # quantyard db grant-app-role: safe
        role = url.split("://", 1)[1].split("@", 1)[0]
        code, data, _ = cli_verify(catalog_url, tmp_path, "--app-role", role)
        assert code == 0 and data["ok"], data
        code, data, _ = run_cli_as(url, tmp_path)  # as the app itself: its own user is checked
        assert code == 0 and data["ok"], data
        owner = catalog.make_engine(catalog_url)
        with owner.begin() as conn:
            conn.execute(text(f'GRANT UPDATE ON audit_events TO "{role}"'))
        owner.dispose()
        code, data, _ = cli_verify(catalog_url, tmp_path, "--app-role", role)
        assert code == 1 and data["grants_unsafe"] == [f"{role} is granted UPDATE on audit_events"]
    code, data, _ = cli_verify(catalog_url, tmp_path, "--app-role", "postgres")  # a superuser
    assert code == 1 and "a superuser" in data["grants_unsafe"][0]
    missing = f"nobody_{uuid.uuid4().hex[:6]}"
    code, data, _ = cli_verify(catalog_url, tmp_path, "--app-role", missing)
    assert code == 1 and data["grants_unsafe"] == [f"the app role {missing!r} does not exist"]


def run_cli_as(url, tmp_path):
    code, out = run_cli(["audit", "verify", "--json"], url, tmp_path)
    return code, json.loads(out), out


def test_anchor_every_n_events(factory, catalog_url, tmp_path):
    store = store_for(tmp_path)
    note(factory, 4)
    assert anchor_if_due(factory, store, interval_s=0, every_events=5) is None  # 4 events: not yet
    note(factory, 1)
    assert anchor_if_due(factory, store, interval_s=0, every_events=5)["seq"] == 5
    note(factory, 4)  # seqs 7..10: counted from the anchor's own event (seq 6), 4 events
    assert anchor_if_due(factory, store, interval_s=0, every_events=5) is None  # 10 - 6 < 5
    note(factory, 1)
    assert anchor_if_due(factory, store, interval_s=0, every_events=5)["seq"] == 11
    assert [a["seq"] for a in read_anchors(store)] == [5, 11]


def test_the_api_anchors_when_it_shuts_down(catalog_url, tmp_path):
    from api.app import create_app
    from tests.api.conftest import make_settings

    settings = make_settings(tmp_path / "data", database_url=catalog_url,
                             storage_url=f"file://{tmp_path / 'objects'}")
    app = create_app(settings)
    with TestClient(app):
        with app.state.session_factory.begin() as s:
            catalog.record_audit(s, actor="key:x", action="note", resource_type="test", resource_id=None,
                                 request=REQ)
    anchors = read_anchors(store_for(tmp_path))
    assert [a["seq"] for a in anchors] == [1]
    with catalog.make_session_factory(catalog.make_engine(catalog_url))() as s:
        assert verify_with_anchors(s, store_for(tmp_path)).ok


# ------------------------------------------------------------------------ deferred chaining


@pytest.fixture
def deferred(engine, factory):
    from quantyard.catalog.audit_seal import defer_chaining

    defer_chaining(engine)
    yield factory
    defer_chaining(engine, False)


def wait_sealed(factory, timeout_s: float = 5.0) -> float:
    """Seconds until nothing is pending (the process's background sealer chained it); fails on timeout."""
    from quantyard.catalog.audit_seal import pending_count

    t0 = time.monotonic()
    while True:
        with factory() as s:
            if pending_count(s) == 0:
                return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout_s, "the sealer left events pending"
        time.sleep(0.01)


@postgres_only
def test_deferred_events_are_chained_by_the_background_sealer(deferred, engine, source):
    """No explicit seal: the commit wakes this process's sealer, which chains within moments
    (SEAL_GATHER_S plus a transaction), off the committing thread."""
    from quantyard.catalog.audit_seal import pending_count

    for i in range(3):
        with deferred.begin() as s:
            catalog.create_job(s, source_id=source.id, targets=["gguf:Q8_0"], labels={"n": str(i)},
                               actor="key:alice", request=REQ)
    took = wait_sealed(deferred)
    print(f"chained {took * 1000:.0f} ms after the last commit")
    assert took < 2.0
    rows = events(deferred)
    assert [r["action"] for r in rows] == ["source.create"] + ["job.create"] * 3
    assert [r["seq"] for r in rows] == [1, 2, 3, 4]
    with deferred() as s:
        result = catalog.verify_audit_chain(s)
        assert result.ok and result.checked == 4 and result.pending == 0 and pending_count(s) == 0


@postgres_only
def test_concurrent_deferred_writes_make_one_unbroken_chain(deferred, engine, source):
    """8 threads x 25 jobs: every job has exactly one job.create event, the chain verifies, and a
    seal that found the lock busy left nothing behind once the sealer has run."""
    import threading

    from quantyard.catalog.audit_seal import seal_pending

    made: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(25):
            with deferred.begin() as s:
                job = catalog.create_job(s, source_id=source.id, targets=["gguf:Q8_0"], actor="key:alice",
                                         labels={"t": str(n), "i": str(i)}, request=REQ)
            with lock:
                made.append(job.id)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seal_pending(engine, wait=True)
    rows = events(deferred)
    created = [r["resource_id"] for r in rows if r["action"] == "job.create"]
    assert sorted(created) == sorted(made) and len(set(created)) == 200
    assert [r["seq"] for r in rows] == list(range(1, 202))
    with deferred() as s:
        result = catalog.verify_audit_chain(s)
    assert result.ok and result.checked == 201 and result.pending == 0


@postgres_only
def test_a_pending_event_cannot_be_changed_or_dropped_and_is_chained_later(deferred, engine, catalog_url, source,
                                                                           tmp_path):
    from sqlalchemy.exc import DBAPIError

    from quantyard.catalog.audit import AUDIT_LOCK_KEY

    wait_sealed(deferred)  # the source's own event first
    with engine.connect() as holder:  # the chain lock is busy: the event stays pending
        holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": AUDIT_LOCK_KEY})
        with deferred.begin() as s:
            catalog.record_audit(s, actor="key:x", action="note", resource_type="test", resource_id="p")
        with deferred() as s:
            assert catalog.verify_audit_chain(s).pending == 1
        for statement in ("UPDATE audit_pending SET actor = 'key:mallory'", "DELETE FROM audit_pending",
                          "TRUNCATE audit_pending"):
            with pytest.raises(DBAPIError, match="audit_pending"), engine.begin() as conn:
                conn.execute(text(statement))
        holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": AUDIT_LOCK_KEY})
        holder.commit()
    wait_sealed(deferred)  # the sealer retries a busy lock every SEAL_EVERY_S
    rows = events(deferred)
    assert (rows[-1]["action"], rows[-1]["actor"], rows[-1]["seq"]) == ("note", "key:x", 2)
    with deferred() as s:
        result = catalog.verify_audit_chain(s)
        assert result.ok and result.pending == 0
    # Sealed, an event is as tamper-evident as any: deleting it is a gap.
    from tests.catalog.test_audit_tamper import tamper

    note(deferred, 1)
    wait_sealed(deferred)
    tamper(engine, "DELETE FROM audit_events WHERE seq = 2")
    with deferred() as s:
        result = catalog.verify_audit_chain(s)
    assert (result.ok, result.problem, result.first_bad_seq) == (False, "missing", 3)


@postgres_only
def test_a_refused_pending_write_rolls_the_change_back(deferred, engine, source):
    from sqlalchemy import func, select

    from quantyard.catalog import Job

    with engine.begin() as conn:
        conn.execute(text("CREATE FUNCTION t_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                          "RAISE EXCEPTION 'refused'; END $$"))
        conn.execute(text("CREATE TRIGGER t_refuse BEFORE INSERT ON audit_pending FOR EACH ROW "
                          "EXECUTE FUNCTION t_refuse()"))
    from quantyard.catalog.audit import AuditUnavailable

    with pytest.raises(AuditUnavailable), deferred.begin() as s:
        catalog.create_job(s, source_id=source.id, targets=["gguf:Q8_0"], actor="key:alice", request=REQ)
    with deferred() as s:
        assert s.execute(select(func.count()).select_from(Job)).scalar_one() == 0
