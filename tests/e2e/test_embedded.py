"""`quantyard serve` from an empty environment, driven by the `quantyard` CLI as a user would."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from tests import oracles

pytestmark = pytest.mark.e2e


def cli(stack, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "quantyard.cli", *args, "--server", stack.url],
                            env=stack.env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\n{result.stderr}\n"
                             f"{stack.logs()}")
    return result


def test_submit_wait_and_download_with_the_cli(embedded_stack, tiny_llama_dir, tmp_path):
    submitted = cli(embedded_stack, "submit", str(tiny_llama_dir), "--target", "gguf:F32",
                    "--target", "gguf:Q8_0", "--label", "team=edge", "--wait", "--json")
    job = json.loads(submitted.stdout)
    assert job["status"] == "succeeded", job
    assert job["labels"] == {"team": "edge"}
    assert len(job["artifact_ids"]) == 2

    listed = json.loads(cli(embedded_stack, "artifacts", "--json").stdout)["items"]
    mine = {a["quantization"]: a for a in listed if a["job_id"] == job["id"]}
    assert set(mine) == {"F32", "Q8_0"}
    for artifact in mine.values():
        assert artifact["uri"].startswith("file://")

    out = tmp_path / "f32.gguf"
    cli(embedded_stack, "download", mine["F32"]["id"], "-o", str(out))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == mine["F32"]["sha256"]
    assert out.stat().st_size == mine["F32"]["size_bytes"]

    result = oracles.compare(tiny_llama_dir, out)
    assert result.llama_ids == result.hf_ids
    assert result.top1_agreement == 1.0
    assert result.max_abs_diff < 0.01

    status = cli(embedded_stack, "status", job["id"])
    assert "succeeded" in status.stdout


def test_unknown_quantization_is_refused_by_the_cli(embedded_stack, tiny_llama_dir):
    result = cli(embedded_stack, "submit", str(tiny_llama_dir), "--target", "gguf:Q9_9",
                 check=False)
    assert result.returncode != 0
    assert "Q9_9" in result.stderr and "Q8_0" in result.stderr
