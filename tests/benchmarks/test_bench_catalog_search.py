"""Smoke test: benchmarks/bench_catalog_search.py runs end to end on Postgres with 20,000 rows,
prints its table, and every query's plan uses an index of ``artifacts`` (no sequential scan)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fixtures.services import PG_ADMIN_URL, _require_postgres

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "bench_catalog_search.py"


def test_bench_catalog_search_quick(tmp_path):
    _require_postgres()
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--rows", "20000", "--repeat", "5", "--pg-admin-url", PG_ADMIN_URL,
         "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    print(proc.stdout[-6000:])
    print(proc.stderr[-3000:], file=sys.stderr)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    results = doc["results"]
    assert len(results) >= 15

    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| query")]
    assert len(table) == len(results)
    assert "worst p95:" in proc.stdout
    for r in results:
        for page in ("first", "next"):
            plan = r["plans"][page]
            if plan is None:
                assert not r["has_next"]
                continue
            assert not plan["seq_scan"], (r["query"], page, plan)
            assert plan["indexes"], (r["query"], page, plan)
        assert r["first"]["n"] == 5 and r["first"]["p50_ms"] > 0
    assert any(r["has_next"] for r in results)
    # the filters that have their own index use it
    by_query = {r["query"]: r["plans"]["first"]["indexes"] for r in results}
    assert "ix_artifacts_organization_id_format_quantization_created_at_id" in by_query["org+format+quant"]
    assert "ix_artifacts_organization_id_size_bytes_id" in by_query["sort=size org+format"]
    assert "ix_artifacts_organization_id_mean_kl_id" in by_query["sort=mean_kl org+max_kl"]
    # free text is planned at run time: a bounded page-order walk, or the text index first
    for r in results:
        plan = r["plans"]["first"]["plan"]
        if r["query"].startswith("text:"):
            assert plan in ("walk", "text-index"), (r["query"], plan)
        else:
            assert plan == "query", (r["query"], plan)
    assert "text: partial words (5%)" in by_query
    # a common word fills its page from the walk
    plans = {r["query"]: r["plans"]["first"]["plan"] for r in results}
    assert plans["text: common word"] == "walk"
