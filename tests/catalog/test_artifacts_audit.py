"""Artifacts, lineage and the hash-chained audit log on SQLite and Postgres."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from quantyard import catalog
from quantyard.catalog import Artifact, AuditEvent, LineageEdge
from quantyard.catalog.audit import event_hash
from quantyard.catalog.models import hashed_fields


def record(s, job, source, target, sha="b" * 64, **kw):
    args = dict(
        job_id=job.id, target_id=target.id, source_id=source.id, format=target.format,
        quantization=target.quantization, sha256=sha, size_bytes=42, uri=f"file:///o/artifacts/{sha}/m.gguf",
        storage_key=f"artifacts/{sha}/m.gguf", filename="tiny-Q8_0.gguf", metrics={"top1_agreement": 0.99},
        metadata={"architecture": "llama", "tensor_count": 12}, engine_version="0.1.0",
        recipe={"source_sha256": source.sha256, "target": target.to_spec_dict(), "engine_version": "0.1.0"},
        recipe_hash="c" * 64,
    )
    args.update(kw)
    return catalog.record_artifact(s, **args)


def test_record_artifact_writes_lineage_and_audit(factory, make_job, source):
    job = make_job(targets=["gguf:Q8_0"])
    with factory.begin() as s:
        catalog.claim_job(s, job_id=job.id, worker_id="w1", lease_s=60, max_attempts=3)
    with factory.begin() as s:
        target = catalog.get_job(s, job_id=job.id).targets[0]
        art = record(s, job, source, target)
        again = record(s, job, source, target)  # idempotent for the same bytes
        assert again.id == art.id
        with pytest.raises(catalog.InvalidState):
            record(s, job, source, target, sha="d" * 64)
    with factory() as s:
        got = catalog.get_artifact(s, artifact_id=art.id)
        d = got.to_dict()
        assert d["id"].startswith("art_") and d["metadata"]["tensor_count"] == 12 and d["key"] == "gguf:Q8_0"
        assert d["metrics"] == {"top1_agreement": 0.99} and d["created_at"].endswith("Z")
        edges = s.execute(select(LineageEdge)).scalars().all()
        assert len(edges) == 1
        assert (edges[0].parent_type, edges[0].parent_id, edges[0].child_type, edges[0].child_id) == (
            "source", source.id, "artifact", art.id)
        assert edges[0].recipe["target"]["quantization"] == "Q8_0" and edges[0].recipe_hash == "c" * 64
        audit = s.execute(select(AuditEvent).where(AuditEvent.action == "artifact.create")).scalars().all()
        assert len(audit) == 1 and audit[0].resource_id == art.id and audit[0].actor == "worker:w1"
        assert catalog.get_job(s, job_id=job.id).to_dict()["artifact_ids"] == [art.id]
        graph = catalog.lineage(s, artifact_id=art.id)
        assert [(n["type"], n["id"], n["depth"]) for n in graph["upstream"]] == [("source", source.id, 1)]
        assert graph["upstream"][0]["name"] == "tiny-llama" and graph["downstream"] == []
        assert catalog.find_artifact_by_recipe(s, recipe_hash="c" * 64).id == art.id
        with pytest.raises(catalog.NotFound):
            catalog.lineage(s, artifact_id="art_nope")


def test_record_artifact_rolls_back_with_the_transaction(factory, make_job, source):
    job = make_job()
    with pytest.raises(RuntimeError):
        with factory.begin() as s:
            record(s, job, source, catalog.get_job(s, job_id=job.id).targets[0])
            raise RuntimeError("crash before commit")
    with factory() as s:
        assert s.execute(select(Artifact)).first() is None
        assert s.execute(select(LineageEdge)).first() is None
        assert catalog.verify_audit_chain(s).ok


def test_lineage_downstream_and_list_artifacts(factory, make_job, source):
    job = make_job(targets=["gguf:Q8_0", "gguf:Q4_K_M"])
    with factory.begin() as s:
        t1, t2 = catalog.get_job(s, job_id=job.id).targets
        a1 = record(s, job, source, t1, sha="1" * 64, filename="tiny-Q8_0.gguf")
        a2 = record(s, job, source, t2, sha="2" * 64, filename="tiny-Q4_K_M.gguf")
        catalog.add_lineage_edge(s, parent_type="artifact", parent_id=a1.id, child_type="artifact",
                                 child_id=a2.id, recipe={"step": "requantize"})
    with factory() as s:
        g = catalog.lineage(s, artifact_id=a1.id)
        assert [n["id"] for n in g["downstream"]] == [a2.id]
        g2 = catalog.lineage(s, artifact_id=a2.id)
        assert {(n["type"], n["depth"]) for n in g2["upstream"]} == {("source", 1), ("artifact", 1)}
        assert [a.id for a in catalog.list_artifacts(s)[0]] == [a2.id, a1.id]
        assert [a.id for a in catalog.list_artifacts(s, quantization="q4_k_m")[0]] == [a2.id]
        assert [a.id for a in catalog.list_artifacts(s, format="GGUF", source_id=source.id)[0]] == [a2.id, a1.id]
        assert [a.id for a in catalog.list_artifacts(s, q="Q8_0")[0]] == [a1.id]
        assert len(catalog.list_artifacts(s, q="tiny-llama")[0]) == 2  # the source's name
        assert catalog.list_artifacts(s, q="100%_")[0] == []
        page, cursor = catalog.list_artifacts(s, limit=1)
        page2, cursor2 = catalog.list_artifacts(s, limit=1, cursor=cursor)
        assert [a.id for a in page + page2] == [a2.id, a1.id] and cursor2 is None


# ------------------------------------------------------------------------------------------ audit


def make_events(factory, make_job, n_jobs=3):
    jobs = [make_job() for _ in range(n_jobs)]
    with factory.begin() as s:
        catalog.request_cancel(s, job_id=jobs[0].id, actor="key:bob", request=catalog.RequestInfo("r9", "::1", "ua"))
    return jobs


def tamper(engine, *statements):
    """Run raw SQL with the append-only guard lifted, as a database admin could."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
        else:
            conn.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update"))
            conn.execute(text("DROP TRIGGER IF EXISTS audit_events_no_delete"))
        for statement in statements:
            conn.execute(text(statement))
        if conn.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE audit_events ENABLE TRIGGER USER"))


def verify(factory):
    with factory() as s:
        return catalog.verify_audit_chain(s)


def test_audit_chain_verifies(factory, make_job):
    make_events(factory, make_job)
    result = verify(factory)
    # source.create + 3 x job.create + job.cancel
    assert result.ok and result.checked == 5 and result.first_bad_id is None and result.reason is None
    with factory() as s:
        events = catalog.audit_events(s, limit=100)
        assert [e.seq for e in events] == [5, 4, 3, 2, 1]
        assert events[-1].prev_hash == "0" * 64 and result.head_hash == events[0].hash
        cancel = events[0].to_dict()
        assert cancel["action"] == "job.cancel" and cancel["actor"] == "key:bob" and cancel["request_id"] == "r9"
        assert cancel["source_ip"] == "::1" and cancel["details"]["to"] == "cancelled"
        for e in events:
            assert e.hash == event_hash(hashed_fields(e))


def test_audit_detects_edited_row(factory, engine, make_job):
    make_events(factory, make_job)
    with factory() as s:
        victim = s.execute(select(AuditEvent).where(AuditEvent.seq == 3)).scalar_one()
    tamper(engine, "UPDATE audit_events SET actor = 'key:mallory' WHERE seq = 3")
    result = verify(factory)
    assert not result.ok and result.first_bad_id == victim.id and "edited" in result.reason and result.checked == 2


def test_audit_detects_edited_details(factory, engine, make_job):
    make_events(factory, make_job)
    with factory() as s:
        victim = s.execute(select(AuditEvent).where(AuditEvent.action == "job.cancel")).scalar_one()
    cast = "CAST('{\"from\": \"queued\", \"to\": \"running\"}' AS JSONB)" if engine.dialect.name == "postgresql" \
        else "'{\"from\": \"queued\", \"to\": \"running\"}'"
    tamper(engine, f"UPDATE audit_events SET details = {cast} WHERE seq = {victim.seq}")
    result = verify(factory)
    assert not result.ok and result.first_bad_id == victim.id


def test_audit_detects_deleted_row(factory, engine, make_job):
    make_events(factory, make_job)
    with factory() as s:
        after = s.execute(select(AuditEvent).where(AuditEvent.seq == 3)).scalar_one()
    tamper(engine, "DELETE FROM audit_events WHERE seq = 2")
    result = verify(factory)
    assert not result.ok and result.first_bad_id == after.id and "gap" in result.reason and result.checked == 1


def test_audit_detects_inserted_row(factory, engine, make_job):
    make_events(factory, make_job)
    with factory() as s:
        head = s.execute(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).scalar_one()
    forged = {
        "seq": head.seq + 1, "id": "aud_forged", "at": head.at, "actor": "key:mallory", "action": "job.create",
        "resource_type": "job", "resource_id": "job_x", "outcome": "success", "request_id": None,
        "source_ip": None, "user_agent": None, "details": {}, "prev_hash": "f" * 64,  # not the real head
    }
    forged["hash"] = event_hash(hashed_fields(forged))
    with factory.begin() as s:
        s.add(AuditEvent(**forged))
    result = verify(factory)
    assert not result.ok and result.first_bad_id == "aud_forged" and "prev_hash" in result.reason


def test_audit_detects_swapped_rows(factory, engine, make_job):
    make_events(factory, make_job)
    with factory() as s:
        two = s.execute(select(AuditEvent).where(AuditEvent.seq == 2)).scalar_one()
    tamper(
        engine,
        "UPDATE audit_events SET seq = -2 WHERE seq = 2",
        "UPDATE audit_events SET seq = 2 WHERE seq = 3",
        "UPDATE audit_events SET seq = 3 WHERE seq = -2",
    )
    result = verify(factory)
    assert not result.ok and result.checked == 1 and result.first_bad_id != two.id


def test_audit_chain_cannot_fork(factory, make_job):
    make_events(factory, make_job, n_jobs=1)
    with factory() as s:
        head = s.execute(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1)).scalar_one()
        fields = {**hashed_fields(head), "seq": head.seq + 1, "id": "aud_fork"}
        fields["prev_hash"] = s.execute(select(AuditEvent.prev_hash).where(AuditEvent.seq == head.seq)).scalar_one()
    with pytest.raises(IntegrityError), factory.begin() as s:
        s.add(AuditEvent(**{**fields, "at": head.at}, hash=event_hash(fields)))


def test_concurrent_appends_keep_one_chain(factory, source):
    errors = []

    def worker(n):
        try:
            for i in range(8):
                with factory.begin() as s:
                    catalog.record_audit(s, actor=f"t{n}", action="test.event", resource_type="test",
                                         resource_id=str(i), outcome="success", details={"n": n, "i": i})
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    result = verify(factory)
    assert result.ok and result.checked == 1 + 32


def test_audit_rows_are_append_only(factory, engine, make_job):
    make_events(factory, make_job, n_jobs=1)
    for statement in ("UPDATE audit_events SET actor = 'x' WHERE seq = 1", "DELETE FROM audit_events WHERE seq = 1"):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
    if engine.dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text("TRUNCATE audit_events"))
    assert verify(factory).ok and verify(factory).checked == 3
