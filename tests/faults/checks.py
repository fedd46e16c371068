"""What every fault scenario checks afterwards, against the catalog (SQL on the suite's own
Postgres), the bucket (listed straight from the S3 server) and the scratch folders."""

from __future__ import annotations

import time

import httpx

from tests.e2e.conftest import upload
from tests.faults.services import wait_until

FINAL = ("succeeded", "failed", "cancelled")


def submit(client: httpx.Client, archive, targets: list[str], **extra) -> str:
    source = upload(client, archive, archive.stem.split(".")[0])
    created = client.post("/v1/jobs", json={"source": source["id"], "targets": targets, **extra})
    assert created.status_code == 202, created.text
    return created.json()["id"]


def get_job(client: httpx.Client, job_id: str) -> dict | None:
    """The job, or None while the API cannot answer (an outage under test)."""
    try:
        response = client.get(f"/v1/jobs/{job_id}", timeout=10)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def wait_final(client: httpx.Client, job_ids: list[str], *, timeout_s: float) -> dict[str, dict]:
    """Every job in a final state (polled with a deadline); {id: job}."""
    done: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(done) < len(job_ids):
        for job_id in job_ids:
            if job_id not in done:
                job = get_job(client, job_id)
                if job is not None and job["status"] in FINAL:
                    done[job_id] = job
        time.sleep(0.5)
    missing = {j: get_job(client, j) for j in job_ids if j not in done}
    assert not missing, f"jobs not final after {timeout_s:.0f}s: " + "; ".join(
        f"{j}: {(m or {}).get('status')} {[(t['status'], t.get('attempts')) for t in (m or {}).get('targets', [])]}"
        for j, m in missing.items())
    return done


def running_owner(fs, job_id: str, *, min_progress: float = 0.0) -> str | None:
    """The worker id holding the job's shared work or one of its targets mid-conversion."""
    rows = fs.sql("SELECT worker_id FROM job_targets WHERE job_id = %(j)s AND status = 'running' "
                  "AND progress >= %(p)s AND lease_expires_at > now() "
                  "UNION ALL SELECT worker_id FROM jobs WHERE id = %(j)s AND status = 'running' "
                  "AND dispatched_at IS NULL AND lease_expires_at > now()", j=job_id, p=min_progress)
    return rows[0][0] if rows else None


def assert_succeeded_exactly_once(fs, jobs: dict[str, dict]) -> None:
    """Every job succeeded; each target has exactly one artifact row (no duplicate made by a
    redelivery) and the job lists exactly those."""
    for job_id, job in jobs.items():
        assert job["status"] == "succeeded", (job, fs.stack.logs())
        assert all(t["status"] == "succeeded" for t in job["targets"]), job
        per_target = fs.sql("SELECT target_id, count(*) FROM artifacts WHERE job_id = %(j)s "
                            "AND target_id IS NOT NULL GROUP BY target_id", j=job_id)
        counts = dict(per_target)
        target_ids = {t["id"] for t in job["targets"]}
        made_here = {tid for tid in target_ids if tid in counts}
        assert all(counts[t] == 1 for t in made_here), (job_id, counts)
        # the intermediate is made once per job (a target asking for its type gets it as its own)
        shared = fs.sql("SELECT format, quantization, count(*) FROM artifacts WHERE job_id = %(j)s "
                        "AND target_id IS NULL GROUP BY format, quantization", j=job_id)
        assert all(n == 1 for _, _, n in shared), (job_id, shared)
        assert len(set(job["artifact_ids"])) == len(job["targets"]), job


def assert_store_clean(fs, *, timeout_s: float = 40) -> None:
    """No temporary object or open multipart upload (the workers' sweep removes a killed write's
    after storage_temp_max_age_s) and no object the catalog does not know."""

    def clean() -> bool:
        return not fs.s3.keys("tmp/") and not fs.s3.open_uploads()

    wait_until(clean, timeout_s=timeout_s, interval_s=1,
               what=f"no temporary objects (left: {fs.s3.keys('tmp/')[:5]} uploads {fs.s3.open_uploads()[:5]})")
    known = {k for (k,) in fs.sql("SELECT storage_key FROM artifacts UNION SELECT storage_key FROM sources")}
    for (meta,) in fs.sql("SELECT metadata FROM artifacts"):
        known.update(c["key"] for c in (meta or {}).get("companion_files", []))
    stored = set(fs.s3.keys("artifacts/")) | set(fs.s3.keys("sources/"))
    assert stored <= known, f"objects no catalog row names: {sorted(stored - known)[:10]}"


def assert_scratch_clean(fs, *, timeout_s: float = 30) -> None:
    """No job_*/tgt_* folder left once every job is final, and no folder of a dead process."""
    wait_until(lambda: not fs.scratch_leftovers() and not fs.dead_scratch_owners(), timeout_s=timeout_s,
               interval_s=0.5,
               what=f"clean scratch (left: {fs.scratch_leftovers()[:5]}, dead: {fs.dead_scratch_owners()[:5]})")


def attempts_summary(jobs: dict[str, dict]) -> str:
    redone = sum(max(j["attempts"] - 1, 0) + sum(max(t["attempts"] - 1, 0) for t in j["targets"])
                 for j in jobs.values())
    return f"{len(jobs)} job(s), {redone} redelivered attempt(s)"
