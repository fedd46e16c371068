"""Smoke test of benchmarks/bench_load.py: 20 jobs from 2 clients against the production shape
(Postgres, Redis, a local object store, `quantyard api` with 2 uvicorn workers, 2 workers), run as
a user runs it. It checks the accounting (every job accepted, listed once, final, succeeded; the
audit chain and its anchors verify), never the timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_bench_load_accounts_for_every_job(postgres_url, redis_url, tmp_path):
    # postgres_url / redis_url: the services must be up (fail loudly in CI); the script makes its
    # own database and uses a Redis db number of its own (12, not the tests' 13).
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_load.py", "--jobs", "20", "--clients", "2", "--store", "local",
         "--redis-db", "12", "--drain-timeout", "240", "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-4000:])
    print(proc.stderr[-4000:], file=sys.stderr)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert (result["submitted"], result["accepted"], result["listed"]) == (20, 20, 20)
    assert (result["lost"], result["duplicates"], result["unexpected"], result["not_final"]) == (0, 0, 0, 0)
    assert result["statuses"] == {"succeeded": 20} and result["reused_targets"] == 20
    assert result["audit"] == "ok" and result["anchors_checked"] >= 1 and result["audit_pending"] == 0
    # 20 job.create + per job its worker's events; every one chained (none left pending).
    assert result["audit_events"] >= 20 * 3
