"""`quantyard convert`'s quality report switches: the default measures one (at the suite's
QUANTYARD_EVALUATION_CHUNKS), --evaluation-chunks sets its extent, --no-evaluation skips it but
keeps validation (a gate without a report fails: tests/engine/test_gates.py)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from quantyard.cli import main


def _convert(model, out, *extra: str):
    args = ["convert", str(model), "-o", str(out), "--json", "--target", "gguf:Q8_0", *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_report_by_default_and_its_extent(tiny_llama_dir, tmp_path):
    r = _convert(tiny_llama_dir, tmp_path / "a", "--evaluation-chunks", "1")
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    quality = row["metrics"]["quality"]
    assert quality["n_chunks"] == 1 and quality["n_tokens"] == 511 // 2 and quality["mean_kl"] > 0
    assert row["metrics"]["top1_agreement"] > 0.9  # validation's own numbers beside it


def test_no_evaluation_keeps_validation(tiny_llama_dir, tmp_path):
    r = _convert(tiny_llama_dir, tmp_path / "b", "--no-evaluation")
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    assert "quality" not in row["metrics"] and row["metrics"]["top1_agreement"] > 0.9

