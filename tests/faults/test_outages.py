"""Outages of the services under the stack: Redis restarted without persistence, Postgres
stopped (and frozen), S3 cut mid-upload, a cancel whose message is gone. Each ends with every job
final and accounted for, nothing orphaned."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.faults.checks import (
    assert_scratch_clean,
    assert_store_clean,
    assert_succeeded_exactly_once,
    attempts_summary,
    get_job,
    submit,
    wait_final,
)
from tests.faults.services import wait_until

pytestmark = pytest.mark.faults

# A target task of its own (a plain float target is made in the prepare task since the plan) whose
# file is as large as the F16 these tests were sized for (the S3 cut must come mid-upload).
ONE = [{"format": "gguf", "quantization": "F16", "params": {"split_max_size": "1G"}}]
# each its own target task (plain float targets are made in the prepare task since the plan)
THREE = ["gguf:Q8_0", "gguf:Q4_0", "gguf:Q5_0"]


def _status(fs, job_id: str) -> str:
    return fs.sql("SELECT status FROM jobs WHERE id = %(j)s", j=job_id)[0][0]


def _target_progress(fs, job_id: str) -> float:
    rows = fs.sql("SELECT max(progress) FROM job_targets WHERE job_id = %(j)s AND status = 'running'", j=job_id)
    return rows[0][0] or 0.0


# ----------------------------------------------------------------------------------------- Redis


def test_redis_restarted_with_jobs_queued_and_a_multi_target_job_running(faults, fresh_archive):
    fs = faults
    with fs.stack.client() as client:
        multi = submit(client, fresh_archive(), THREE)
        singles = [submit(client, fresh_archive(), ONE) for _ in range(2)]
        queued = wait_until(lambda: [j for j in singles if _status(fs, j) == "queued"] or None,
                            timeout_s=30, interval_s=0.1, what="a job waiting in the queue")
        depth = sum(fs.redis.queue_lengths().values())
        fs.redis.restart()  # every message is gone
        first = time.monotonic()
        fs.note(f"restart 1: {len(queued)} job(s) queued, {depth} message(s) in Redis lost")
        # The multi-target job's targets dispatched and not all done: restart again.
        wait_until(lambda: fs.sql("SELECT count(*) FROM job_targets WHERE job_id = %(j)s AND status "
                                  "IN ('pending', 'running')", j=multi)[0][0] >= 1
                   and fs.sql("SELECT dispatched_at IS NOT NULL FROM jobs WHERE id = %(j)s", j=multi)[0][0],
                   timeout_s=120, interval_s=0.1, what="the 3-target job dispatched, targets unfinished")
        pending = fs.sql("SELECT status, count(*) FROM job_targets WHERE job_id = %(j)s GROUP BY status", j=multi)
        fs.redis.restart()
        second = time.monotonic()
        fs.note(f"restart 2: the 3-target job's targets {dict(pending)}")
        jobs = wait_final(client, [multi, *singles], timeout_s=240)
    fs.note(f"all final {time.monotonic() - first:.1f}s after restart 1, {time.monotonic() - second:.1f}s "
            f"after restart 2; {attempts_summary(jobs)}")
    assert_succeeded_exactly_once(fs, jobs)
    assert len(jobs[multi]["artifact_ids"]) == 3
    assert_store_clean(fs)
    assert_scratch_clean(fs)


def test_cancel_of_a_job_whose_message_is_gone(faults, fresh_archive):
    fs = faults
    with fs.stack.client() as client:
        # No worker serves this class, so the job stays queued; then its message is lost.
        job_id = submit(client, fresh_archive(), ONE, hardware_class="cuda")
        assert _status(fs, job_id) == "queued"
        with fs.redis.client() as r:
            r.flushall()
        started = time.monotonic()
        response = client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code in (200, 202), response.text
        job = wait_final(client, [job_id], timeout_s=60)[job_id]
    fs.note(f"cancelled {time.monotonic() - started:.1f}s after the cancel request")
    assert job["status"] == "cancelled", job
    assert all(t["status"] == "cancelled" for t in job["targets"]), job
    assert job["artifact_ids"] == []


# -------------------------------------------------------------------------------------- Postgres


def _probe_api(client: httpx.Client, job_id: str, source_id: str) -> list[tuple[int, float, str]]:
    """One round of requests the dashboard and clients make: (status, seconds, error code)."""
    out = []
    for method, url, body in (("GET", f"/v1/jobs/{job_id}", None), ("GET", "/v1/jobs?limit=5", None),
                              ("POST", "/v1/jobs", {"source": source_id, "targets": ONE})):
        started = time.monotonic()
        response = client.request(method, url, json=body, timeout=30)
        took = time.monotonic() - started
        code = response.json().get("error", {}).get("code", "") if response.status_code >= 400 else ""
        out.append((response.status_code, took, code))
    return out


def _postgres_outage(faults, fresh_archive, *, seconds: float, freeze: bool) -> None:
    fs = faults
    with fs.stack.client() as client:
        job_ids = [submit(client, fresh_archive(), ONE) for _ in range(3)]
        source_id = get_job(client, job_ids[0])["source_id"]
        wait_until(lambda: any(_status(fs, j) == "running" for j in job_ids), timeout_s=60, interval_s=0.1,
                   what="a job running")
        states = {j: _status(fs, j) for j in job_ids}
        fs.pg.freeze() if freeze else fs.pg.stop()
        down = time.monotonic()
        answers = []
        while time.monotonic() - down < seconds:
            answers.extend(_probe_api(client, job_ids[0], source_id))
            time.sleep(0.5)
        fs.pg.thaw() if freeze else fs.pg.start()
        back = time.monotonic()
        statuses = sorted({a[0] for a in answers})
        fs.note(f"Postgres {'frozen' if freeze else 'stopped'} {back - down:.1f}s with jobs {states}; "
                f"{len(answers)} API answers {statuses}, slowest {max(a[1] for a in answers):.1f}s")
        jobs = wait_final(client, job_ids, timeout_s=240)
        fs.note(f"all final {time.monotonic() - back:.1f}s after Postgres came back; {attempts_summary(jobs)}")
    assert answers and all(a[0] == 503 and a[2] == "catalog_unavailable" for a in answers), answers
    assert max(a[1] for a in answers) < 15, answers  # no hang
    assert_succeeded_exactly_once(fs, jobs)
    assert_store_clean(fs)
    assert_scratch_clean(fs)


def test_postgres_stopped_api_503_then_every_job_finishes(faults, fresh_archive):
    # 15 s: past the 10 s lease, so running work loses its lease mid-outage (the long run: 30 s)
    _postgres_outage(faults, fresh_archive, seconds=15, freeze=False)


@pytest.mark.faults_long
def test_postgres_stopped_30s_api_503_then_every_job_finishes(faults, fresh_archive):
    _postgres_outage(faults, fresh_archive, seconds=30, freeze=False)


@pytest.mark.faults_long
def test_postgres_frozen_api_503_without_hanging_then_every_job_finishes(faults, fresh_archive):
    _postgres_outage(faults, fresh_archive, seconds=20, freeze=True)


# -------------------------------------------------------------------------------------------- S3


def _cut_s3_mid_upload(fs, job_id: str) -> float:
    """Cut S3 while the target's artifact is being uploaded: once the shared work is published,
    uploads are slowed (so the artifact's takes seconds), then the cut comes mid-upload."""
    wait_until(lambda: fs.sql("SELECT dispatched_at IS NOT NULL FROM jobs WHERE id = %(j)s", j=job_id)[0][0],
               timeout_s=120, interval_s=0.05, what="the job's shared work done")
    fs.s3.proxy.upload_rate_bps = 1_000_000
    try:
        wait_until(lambda: _target_progress(fs, job_id) >= 0.91, timeout_s=120, interval_s=0.05,
                   what="the artifact's upload started")
        time.sleep(1.5)
        fs.s3.cut()
    finally:
        fs.s3.proxy.upload_rate_bps = None
    return time.monotonic()


def test_s3_cut_mid_upload_is_retried(faults, fresh_archive):
    fs = faults
    with fs.stack.client() as client:
        job_id = submit(client, fresh_archive(), ONE)
        cut = _cut_s3_mid_upload(fs, job_id)
        # Nothing stored yet at the cut: the upload really was under way (the test's own client
        # talks to the server directly, not through the cut proxy).
        stored_at_cut = fs.s3.keys(f"artifacts/{job_id}/tgt_")
        time.sleep(4)  # the upload meets the outage for a while (retry window: 12 s)
        fs.s3.restore()
        restored = time.monotonic()
        job = wait_final(client, [job_id], timeout_s=120)[job_id]
    fs.note(f"S3 cut {restored - cut:.1f}s mid-upload; succeeded {time.monotonic() - restored:.1f}s "
            "after it came back")
    assert_succeeded_exactly_once(fs, {job_id: job})
    assert job["targets"][0]["attempts"] == 1, job  # retried inside the attempt, not redone
    assert stored_at_cut == [], stored_at_cut
    # (botocore's own retries or the store's retry loop, whichever outlasted the cut)
    assert_store_clean(fs)


def test_s3_down_past_the_retry_window_fails_cleanly_then_recovers(faults, fresh_archive):
    fs = faults
    with fs.stack.client() as client:
        job_id = submit(client, fresh_archive(), ONE)
        cut = _cut_s3_mid_upload(fs, job_id)
        job = wait_final(client, [job_id], timeout_s=150)[job_id]
        failed = time.monotonic()
        fs.s3.restore()
        fs.note(f"S3 down; the target failed {failed - cut:.1f}s after the cut")
        target = job["targets"][0]
        assert job["status"] == "failed" and target["status"] == "failed", job
        assert target["error"]["code"] == "storage_unavailable", target
        message = target["error"]["message"]
        assert "s3://" not in message and "127.0.0.1" not in message, message
        rows = fs.sql("SELECT count(*) FROM artifacts WHERE target_id = %(t)s", t=target["id"])[0][0]
        assert rows == 0
        assert not fs.s3.keys(f"artifacts/{job_id}/{target['id']}/")
        assert_store_clean(fs)  # temporary leftovers swept once S3 is back
        again = submit(client, fresh_archive(), ONE)
        after = wait_final(client, [again], timeout_s=120)
    fs.note(f"the next job succeeded {time.monotonic() - failed:.1f}s after S3 came back")
    assert_succeeded_exactly_once(fs, after)
    assert_scratch_clean(fs)


def test_api_while_s3_is_down_answers_without_hanging(faults, fresh_archive):
    """An upload while S3 is cut: a bounded wait (the API's store retries ~10 s), then 503
    storage_unavailable naming no store; readiness says which check failed; well again after."""
    fs = faults
    archive = fresh_archive()
    with fs.stack.client() as client:
        fs.s3.cut()
        try:
            answers = {}
            for what, call in (
                    ("upload", lambda: client.post("/v1/sources", params={"name": "during-outage"},
                                                   content=archive.read_bytes(),
                                                   headers={"Content-Type": "application/gzip"})),
                    ("readyz", lambda: client.get("/readyz"))):
                started = time.monotonic()
                response = call()
                answers[what] = (response.status_code, round(time.monotonic() - started, 1),
                                 response.text[:300])
        finally:
            fs.s3.restore()
        fs.note(f"while S3 was down: {answers}")
        after = client.post("/v1/sources", params={"name": "after-outage"}, content=archive.read_bytes(),
                            headers={"Content-Type": "application/gzip"})
    assert after.status_code == 201, after.text
    assert all(seconds < 30 for _, seconds, _ in answers.values()), answers
    assert answers["readyz"][0] == 503 and "storage" in answers["readyz"][2], answers
    status, _, body = answers["upload"]
    assert status == 503 and '"storage_unavailable"' in body, answers
    assert "s3://" not in body and "127.0.0.1" not in body, answers
    assert_store_clean(fs)  # the cut upload's temporary leftovers are swept
