"""Smoke test: benchmarks/bench_onnx.py still runs end to end (its --quick mode, fp32 only).

Runs as a user would (a subprocess, --json-out) on the real all-MiniLM-L6-v2: Quantyard's
convert_onnx and the plain reference recipe (legacy torch.onnx.export + onnxruntime optimizer)
in the global interpreter. Optimum's venv is pointed at a folder that does not exist, so its row
must say "unavailable" rather than crash; the real Optimum comparison is run by hand
(benchmarks/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "bench_onnx.py"


def test_bench_onnx_quick(tmp_path, minilm_dir):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--model", str(minilm_dir), "--reference", "both",
         "--optimum-venv", str(tmp_path / "no-venv"), "--work-dir", str(tmp_path / "work"), "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    print(proc.stdout[-6000:])
    print(proc.stderr[-3000:], file=sys.stderr)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = {(r["quantization"], r["pipeline"]): r for r in doc["rows"]}
    assert set(rows) == {("fp32", "quantyard"), ("fp32", "plain-ref"), ("fp32", "optimum")}
    assert doc["references"] == ["optimum", "plain-ref"]

    # the printed table carries every row
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3  # header and rows (the separator starts with "|-")
    for pipeline in ("quantyard", "plain-ref", "optimum"):
        assert any(f"| fp32  | {pipeline} " in line for line in table), pipeline

    optimum = rows[("fp32", "optimum")]
    assert optimum["status"] == "unavailable" and "--setup-optimum" in optimum["notes"]

    for pipeline in ("quantyard", "plain-ref"):
        row = rows[("fp32", pipeline)]
        assert row["status"] == "ok", row
        assert row["seconds"] > 0 and row["peak_rss"] > 100 * 2**20
        # MiniLM's 22.7 M float32 weights: ~87 MB however the graph is fused
        assert 80e6 < row["size_bytes"] < 100e6, row["size_bytes"]
        # fp32 through onnxruntime stays within float rounding of PyTorch on unseen sentences
        assert row["min_cosine"] >= 0.99, row
        assert row["max_abs_diff"] < 1e-3, row
        assert 0 < row["latency_ms_p50"] < 2000

    quantyard = rows[("fp32", "quantyard")]
    assert quantyard["min_cosine"] >= 0.9999
    # conversion alone is timed apart from Quantyard's validate+measure stage
    assert 0 < quantyard["convert_seconds"] < quantyard["seconds"]
    assert 0 < quantyard["convert_peak_rss"] <= quantyard["peak_rss"]
    # outputs are removed unless --keep (the work dir itself stays when given)
    assert not list((tmp_path / "work").rglob("*.onnx"))
