"""POST/GET /v1/jobs, cancel, waiting reasons, broker outage."""

from __future__ import annotations

import socket

from quantyard import catalog
from quantyard.queue import CONVERT_TASK
from tests.api.conftest import broker_messages, build_client, make_settings


def submit(client, source_id, targets=("gguf:Q8_0",), **extra):
    return client.post("/v1/jobs", json={"source": source_id, "targets": list(targets), **extra})


def test_create_job_queues_a_message(client, settings, source):
    r = submit(client, source["id"], ["gguf:q8_0", {"format": "GGUF", "quantization": "f16"}],
               labels={"team": "edge"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["source_id"] == source["id"]
    assert job["labels"] == {"team": "edge"}
    assert [(t["format"], t["quantization"]) for t in job["targets"]] == [("gguf", "Q8_0"), ("gguf", "F16")]
    assert all(t["status"] == "pending" for t in job["targets"])
    msgs = broker_messages(settings)
    assert len(msgs) == 1
    assert msgs[0]["headers"]["task"] == CONVERT_TASK
    assert msgs[0]["body"][0] == [job["id"]]

    got = client.get(f"/v1/jobs/{job['id']}")
    assert got.status_code == 200
    assert got.json()["id"] == job["id"]
    assert 0.0 <= got.json()["progress"] <= 1.0


def test_unknown_quantization_lists_valid_values(client, source):
    r = submit(client, source["id"], ["gguf:Q9_X"])
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "unsupported_target"
    assert "Q9_X" in err["message"] and "Q8_0" in err["message"] and "F16" in err["message"]


def test_unknown_format(client, source):
    r = submit(client, source["id"], ["onnx-nope:int8"])
    assert r.status_code == 422
    assert "gguf" in r.json()["error"]["message"]


def test_unknown_hardware_class(client, source):
    r = submit(client, source["id"], hardware_class="tpu")
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "unsupported_hardware_class"
    assert "cpu" in err["message"] and "cuda" in err["message"]


def test_unknown_source(client, settings):
    r = submit(client, "src_doesnotexist")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "source_not_found"
    assert broker_messages(settings) == []


def test_empty_and_duplicate_targets(client, source):
    r = submit(client, source["id"], [])
    assert r.status_code == 422
    r = submit(client, source["id"], ["gguf:Q8_0", "GGUF:q8_0"])
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "duplicate_target"


def test_missing_field_names_the_field(client):
    r = client.post("/v1/jobs", json={"targets": ["gguf:Q8_0"]})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "validation_error"
    assert "source" in err["message"]


def test_source_by_uri_in_the_store(client, app, source):
    r = submit(client, source["uri"])
    assert r.status_code == 202, r.text
    new_source = client.get(f"/v1/sources/{r.json()['source_id']}").json()
    assert new_source["sha256"] == source["sha256"]
    missing = app.state.store.url.rstrip("/") + "/sources/nothing/here.tar.gz"
    r = submit(client, missing)
    assert r.status_code == 404


def test_waiting_reason_without_workers(client, source):
    job = submit(client, source["id"], hardware_class="cuda").json()
    assert job["waiting_reason"] == "no live worker serves hardware class 'cuda'"
    got = client.get(f"/v1/jobs/{job['id']}").json()
    assert got["status"] == "queued"
    assert got["waiting_reason"] == "no live worker serves hardware class 'cuda'"


def test_waiting_reason_when_workers_are_busy(client, app, source):
    with app.state.session_factory() as s:
        catalog.worker_heartbeat(s, worker_id="w1", hostname="h", hardware_class="cpu", capabilities={})
        s.commit()
    first = submit(client, source["id"]).json()
    assert "waiting_reason" not in first  # a worker is idle
    with app.state.session_factory() as s:
        outcome = catalog.claim_job(s, job_id=first["id"], worker_id="w1", lease_s=60, max_attempts=3)
        s.commit()
        assert outcome.kind == "claimed"
    second = client.get(f"/v1/jobs/{submit(client, source['id']).json()['id']}").json()
    assert "busy" in second["waiting_reason"]


def test_cancel_queued_job_then_409(client, source):
    job = submit(client, source["id"]).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "job_finished"


def test_cancel_finished_job_is_409(client, app, source):
    job = submit(client, source["id"]).json()
    with app.state.session_factory() as s:
        catalog.finish_job(s, job_id=job["id"], status="failed", error_code="invalid_model", error_message="bad")
        s.commit()
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409
    got = client.get(f"/v1/jobs/{job['id']}").json()
    assert got["error"] == {"code": "invalid_model", "message": "bad"}


def test_cancel_unknown_job(client):
    r = client.post("/v1/jobs/job_nope/cancel")
    assert r.status_code == 404


def test_list_jobs_filters_and_pages(client, source):
    ids = [submit(client, source["id"], labels={"run": str(i % 2)}).json()["id"] for i in range(5)]
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    seen = [j["id"] for j in page["items"]]
    while page["next_cursor"]:
        page = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
        seen += [j["id"] for j in page["items"]]
    assert sorted(seen) == sorted(ids)
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    run1 = client.get("/v1/jobs", params={"label": "run=1"}).json()["items"]
    assert sorted(j["id"] for j in run1) == sorted(ids[1::2])
    assert client.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
    assert client.get("/v1/jobs", params={"cursor": "garbage!"}).status_code == 400


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_broker_down_fails_the_job_and_503(tmp_path):
    settings = make_settings(tmp_path / "d", broker_url=f"redis://127.0.0.1:{_closed_port()}/0")
    with build_client(settings) as client:
        from tests.api import archives
        from tests.api.conftest import upload

        src = upload(client, archives.model_tar_gz()).json()
        r = submit(client, src["id"])
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "broker_unavailable"
        job = client.get(f"/v1/jobs/{err['details']['job_id']}").json()
        assert job["status"] == "failed"
        assert job["error"]["code"] == "broker_unavailable"


def test_job_roundtrip_sqlite_and_postgres(any_db_client):
    from tests.api import archives
    from tests.api.conftest import upload

    client = any_db_client
    src = upload(client, archives.model_tar_gz())
    assert src.status_code == 201, src.text
    job = submit(client, src.json()["id"], hardware_class="cuda", labels={"team": "edge"})
    assert job.status_code == 202, job.text
    got = client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert got["status"] == "queued" and "cuda" in got["waiting_reason"]
    assert [j["id"] for j in client.get("/v1/jobs", params={"label": "team=edge"}).json()["items"]] == [got["id"]]
    assert client.post(f"/v1/jobs/{got['id']}/cancel").json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{got['id']}/cancel").status_code == 409
    text = client.get("/metrics").text
    assert 'quantyard_jobs_finished_total{outcome="cancelled"} 1.0' in text
    assert client.get("/readyz").status_code == 200


def test_job_on_redis_broker(redis_url, tmp_path):
    import redis

    from tests.api import archives
    from tests.api.conftest import upload

    settings = make_settings(tmp_path / "d", broker_url=redis_url)
    with build_client(settings) as client:
        assert client.get("/readyz").status_code == 200
        src = upload(client, archives.model_tar_gz()).json()
        r = redis.Redis.from_url(redis_url)
        before = r.llen("convert.cuda")
        job = submit(client, src["id"], hardware_class="cuda")
        assert job.status_code == 202, job.text
        assert r.llen("convert.cuda") == before + 1
        r.delete("convert.cuda")


def test_registering_the_same_uri_twice_reuses_the_source(client, source):
    first = submit(client, source["uri"]).json()["source_id"]
    second = submit(client, source["uri"]).json()["source_id"]
    assert first == second == source["id"]


def test_uri_outside_the_store(client):
    r = submit(client, "s3://someone-else/model.tar.gz")
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_source"


def test_a_remembered_source_withdrawn_or_deleted_since_is_refused(any_db_client):
    """The API remembers a source's facts after its first job (api/routes/jobs.py
    submission_source); on Postgres the job's INSERT itself then checks that the source still
    exists and is not withdrawn. Withdrawn since: 422 naming the withdrawal; gone: 404; nothing
    written either way."""
    from sqlalchemy import event, func, select, text

    from tests.api import archives
    from tests.api.conftest import upload

    client, app = any_db_client, any_db_client.app
    source_id = upload(client, archives.model_tar_gz()).json()["id"]
    assert submit(client, source_id).status_code == 202  # the facts are remembered from here on
    reads: list[str] = []

    def count_source_reads(_conn, _cursor, statement, *_args) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM sources" in statement:
            reads.append(statement)

    engine = app.state.db_engine
    event.listen(engine, "before_cursor_execute", count_source_reads)
    try:
        assert submit(client, source_id).status_code == 202
    finally:
        event.remove(engine, "before_cursor_execute", count_source_reads)
    # Postgres: the guarded INSERT checks the source, nothing reads it; SQLite reads it once.
    assert len(reads) == (0 if engine.dialect.name == "postgresql" else 1), reads
    assert client.post(f"/v1/sources/{source_id}/withdraw", json={"reason": "leaked weights"}).status_code == 200

    def jobs() -> int:
        with app.state.session_factory() as s:
            return s.execute(select(func.count()).select_from(catalog.Job)).scalar_one()

    before = jobs()
    r = submit(client, source_id)
    assert r.status_code == 422 and r.json()["error"]["code"] == "source_withdrawn", r.text
    assert "leaked weights" in r.json()["error"]["message"]
    assert jobs() == before
    # Gone altogether (as if removed behind the API's back): 404, and still nothing written.
    with app.state.db_engine.begin() as conn:
        conn.execute(text("UPDATE sources SET withdrawn_at = NULL"))
    assert submit(client, source_id).status_code == 202  # re-read: allowed again, remembered again
    with app.state.db_engine.begin() as conn:
        conn.execute(text("UPDATE sources SET organization_id = 'org_elsewhere'"))
    r = submit(client, source_id)
    assert r.status_code == 404 and r.json()["error"]["code"] == "source_not_found", r.text
    assert jobs() == before + 1
