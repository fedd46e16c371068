"""The audit trail through the API: fail closed when the audit write fails, and the JSON-lines export.

Fail closed: the database is made to refuse one audit action (a trigger installed by the test, or
the app's role losing INSERT on audit_events); a real request whose change that action describes
gets a 503 with the standard error JSON, and the change is not in the catalog.
"""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, text

from quantyard import catalog
from quantyard.catalog import AuditEvent, Job, Source
from quantyard.catalog.audit import verify_export
from quantyard.catalog.audit_seal import AUDIT_PENDING
from quantyard.catalog.models import GENESIS_HASH
from tests.api import archives
from tests.api.conftest import broker_messages, build_client, make_settings, upload
from tests.catalog.test_audit_tamper import app_role, run_cli

REFUSE = {
    "sqlite": [
        ("CREATE TRIGGER test_refuse_audit BEFORE INSERT ON audit_events WHEN NEW.action = '{action}' "
         "BEGIN SELECT RAISE(ABORT, 'audit store refused'); END"),
    ],
    # Both tables: direct chaining appends to audit_events, deferred writes audit_pending first.
    "postgresql": [
        ("CREATE FUNCTION test_refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
         "RAISE EXCEPTION 'audit store refused'; END $$"),
        *(f"CREATE TRIGGER test_refuse_audit BEFORE INSERT ON {table} FOR EACH ROW "
          "WHEN (NEW.action = '{action}') EXECUTE FUNCTION test_refuse_audit()" for table in ("audit_events", "audit_pending")),
    ],
}


def other_model() -> bytes:
    return archives.model_tar_gz({**archives.model_files(), "note.txt": b"another model"})


def refuse_audit(app, action: str) -> None:
    engine = app.state.db_engine
    with engine.begin() as conn:
        for statement in REFUSE[engine.dialect.name]:
            conn.execute(text(statement.replace("{action}", action)))


def allow_audit(app) -> None:
    with app.state.db_engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(text("DROP TRIGGER test_refuse_audit"))
            return
        for table in ("audit_events", "audit_pending"):
            conn.execute(text(f"DROP TRIGGER test_refuse_audit ON {table}"))


def counts(app) -> dict:
    """Rows per table; ``audit_events`` counts every recorded event, chained or still pending
    (deferred chaining: the sealer chains it moments after the commit). One statement, so one
    snapshot: counted in two, a seal committed between them would hide the events it moved."""
    tables = {m.__tablename__: m.__table__ for m in (Source, Job, AuditEvent)}
    if app.state.db_engine.dialect.name == "postgresql":
        tables["audit_pending"] = AUDIT_PENDING
    with app.state.session_factory() as s:
        row = s.execute(select(*(select(func.count()).select_from(t).scalar_subquery()
                                 for t in tables.values()))).one()
    found = dict(zip(tables, row, strict=True))
    found["audit_events"] += found.pop("audit_pending", 0)
    return found


def submit(client, source_id):
    return client.post("/v1/jobs", json={"source": source_id, "targets": ["gguf:Q8_0"]})


def assert_refused(r) -> None:
    assert r.status_code == 503, r.text
    assert r.json() == {"error": {"code": "audit_unavailable", "message": r.json()["error"]["message"]}}
    assert "could not be written" in r.json()["error"]["message"] and r.headers["x-request-id"]


@pytest.mark.parametrize("action", ["job.create", "job.cancel", "source.create"])
def test_failed_audit_write_fails_the_request(any_db_client, action):
    client, app = any_db_client, any_db_client.app
    settings = app.state.settings
    source = upload(client, archives.model_tar_gz()).json()
    job = submit(client, source["id"]).json()
    before, queued = counts(app), len(broker_messages(settings))
    refuse_audit(app, action)
    if action == "job.create":
        r = submit(client, source["id"])
    elif action == "job.cancel":
        r = client.post(f"/v1/jobs/{job['id']}/cancel")
    else:
        r = upload(client, other_model(), name="other")
    assert_refused(r)
    # No change without its record: no new source, job or event; the job is still queued; nothing sent.
    assert counts(app) == before
    # ...and no bytes either: the refused upload's object was removed again
    assert [k for k in app.state.store.list_keys("sources/") if k.startswith("sources/")] == [source["storage_key"]]
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    assert len(broker_messages(settings)) == queued
    with app.state.session_factory() as s:
        assert catalog.verify_audit_chain(s).ok
    allow_audit(app)  # the same request goes through once its audit record can be written
    if action == "job.create":
        assert submit(client, source["id"]).status_code == 202
    elif action == "job.cancel":
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    else:
        assert upload(client, other_model(),
                      name="other").status_code == 201
    assert counts(app)["audit_events"] == before["audit_events"] + 1


@pytest.mark.parametrize("catalog_url", ["postgres"], indirect=True)
def test_app_role_without_audit_insert_cannot_change_anything(catalog_url, tmp_path):
    with app_role(catalog_url, tmp_path) as url, \
            build_client(make_settings(tmp_path / "data", database_url=url), migrate=False) as client:
        source = upload(client, archives.model_tar_gz()).json()  # the app role runs the API as usual
        assert submit(client, source["id"]).status_code == 202
        role = client.app.state.db_engine.url.username
        admin = catalog.make_engine(catalog_url)
        try:
            with admin.begin() as conn:
                # both: deferred chaining writes audit_pending, and its sealer audit_events
                conn.execute(text(f'REVOKE INSERT ON audit_events, audit_pending FROM "{role}"'))
            assert_refused(submit(client, source["id"]))
            assert_refused(upload(client, other_model(), name="x"))
            with admin.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 1
                assert conn.execute(text("SELECT count(*) FROM sources")).scalar_one() == 1
        finally:
            admin.dispose()
            client.app.state.db_engine.dispose()


def test_download_is_refused_when_it_cannot_be_audited(client, source):
    app = client.app
    job = submit(client, source["id"]).json()
    stored = app.state.store.put_stream("artifacts/x/m.gguf", io.BytesIO(b"GGUF bytes"))
    with app.state.session_factory.begin() as s:
        catalog.claim_job(s, job_id=job["id"], worker_id="w1", lease_s=60, max_attempts=3)
        target = catalog.get_job(s, job_id=job["id"]).targets[0]
        art = catalog.record_artifact(
            s, job_id=job["id"], target_id=target.id, source_id=source["id"], format="gguf", quantization="Q8_0",
            sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri, storage_key=stored.key,
            filename="m.gguf", metrics={}, metadata={}, engine_version="t", recipe={}, recipe_hash="c" * 64)
    refuse_audit(app, "artifact.download")
    r = client.get(f"/v1/artifacts/{art.id}/download")
    assert_refused(r)
    assert b"GGUF" not in r.content
    allow_audit(app)
    r = client.get(f"/v1/artifacts/{art.id}/download")
    assert r.status_code == 200 and r.content == b"GGUF bytes"


# ---------------------------------------------------------------------------------------- export


def export(client, **params) -> list[str]:
    r = client.get("/v1/audit", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/jsonl")
    assert "attachment" in r.headers["content-disposition"]
    return r.text.splitlines(keepends=True)


def test_export_time_ranges_reverify(any_db_client, tmp_path):
    client = any_db_client
    source = upload(client, archives.model_tar_gz()).json()
    for _ in range(2):
        assert submit(client, source["id"]).status_code == 202
    time.sleep(0.01)
    mid = datetime.now(UTC)
    time.sleep(0.01)
    job = submit(client, source["id"]).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")

    everything = export(client)
    events = [json.loads(line) for line in everything]
    # seq 1: the test client's own API key (tests/api/conftest.py build_client).
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e["action"] for e in events] == ["key.create", "source.create", "job.create", "job.create", "job.create",
                                             "job.cancel"]
    assert all({"seq", "prev_hash", "hash", "at", "actor", "details"} <= e.keys() for e in events)
    assert {e["organization_id"] for e in events} == {"org_default"}
    result = verify_export(everything, start_hash=GENESIS_HASH)
    assert result.ok and result.checked == 6 and result.head_hash == events[-1]["hash"]

    later = export(client, since=mid.isoformat())
    assert [json.loads(line)["seq"] for line in later] == [5, 6] and verify_export(later).ok
    # The piece links onto the one before it.
    assert verify_export(later, start_hash=events[3]["hash"]).ok
    assert not verify_export(later, start_hash=events[2]["hash"]).ok
    earlier = export(client, until=mid.replace(tzinfo=None).isoformat())  # naive means UTC
    assert [json.loads(line)["seq"] for line in earlier] == [1, 2, 3, 4] and verify_export(earlier).ok
    assert export(client, since="2000-01-01T00:00:00Z", until="2000-01-02T00:00:00Z") == []

    # An exported line that was edited or dropped does not re-verify.
    edited = [*everything[:3], everything[3].replace('"actor":"test-admin"', '"actor":"key:mallory"'), *everything[4:]]
    assert edited != everything
    bad = verify_export(edited)
    assert (bad.ok, bad.problem, bad.first_bad_seq) == (False, "edited", 4)
    bad = verify_export(everything[:3] + everything[4:])
    assert (bad.ok, bad.problem, bad.first_bad_seq) == (False, "missing", 5)

    # The CLI writes the same lines, and verifies the file.
    url = client.app.state.settings.resolved_database_url
    out = tmp_path / "audit.jsonl"
    code, _ = run_cli(["audit", "export", "--since", mid.isoformat(), "-o", str(out)], url, tmp_path)
    assert code == 0 and out.read_text().splitlines(keepends=True) == later
    code, text_out = run_cli(["audit", "verify", "--file", str(out)], url, tmp_path)
    assert code == 0 and "2 event(s)" in text_out
    out.write_text("".join(edited))
    code, text_out = run_cli(["audit", "verify", "--file", str(out), "--json"], url, tmp_path)
    assert code == 1 and json.loads(text_out)["first_bad_seq"] == 4


def test_export_rejects_bad_parameters(client):
    r = client.get("/v1/audit", params={"format": "csv"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error" and "jsonl" in r.text
    r = client.get("/v1/audit", params={"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"})
    assert r.status_code == 422 and "earlier" in r.json()["error"]["message"]
    r = client.get("/v1/audit", params={"since": "yesterday"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    # A catalog with nothing but the test client's key exports that one event.
    assert [json.loads(line)["action"] for line in client.get("/v1/audit").text.splitlines()] == ["key.create"]
    assert client.get("/v1/audit", params={"until": "2000-01-01T00:00:00Z"}).text == ""
