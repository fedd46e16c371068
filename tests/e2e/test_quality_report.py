"""Issue 13 through the worker pipelines (in-process, real SQLite catalog and local store, the
engine itself; the Celery plumbing is covered by the other e2e tests): each GGUF artifact gets a
quality report, recomputed here independently (a fresh transformers reference, llama.cpp on the
downloaded file) to agree; a Q2_K whose gate is below its measured KL fails with the numbers and
publishes nothing, a loose gate passes, the other targets are unaffected."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from quantyard import catalog
from quantyard.engine.evaluation import compute_eval_reference, evaluate_gguf
from quantyard.settings import Settings
from worker.pipeline import run_job
from worker.runtime import build_runtime
from worker.target_pipeline import run_target

# A short evaluation text of our own (params.evaluation_text): a few chunks keep the test cheap.
TEXT = Path(__file__).read_text()[:4000]


@pytest.fixture
def runtime(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", job_lease_s=30, job_max_attempts=1)
    settings.data_dir.mkdir()
    catalog.upgrade_database(settings.resolved_database_url)
    return build_runtime(settings, worker_id="test-worker:cpu")


def _source(runtime, model_dir: Path, tmp_path: Path) -> str:
    archive = tmp_path / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    stored = runtime.store.put_file("sources/test/source.tar.gz", archive)
    with runtime.session() as s:
        source = catalog.create_source(s, name="tiny-llama", sha256=stored.sha256, size_bytes=stored.size_bytes,
                                       uri=stored.uri, storage_key=stored.key, architecture="LlamaForCausalLM",
                                       metadata={}, actor="test", request=None)
        s.commit()
        return source.id


def _target(quant: str, gates: dict | None = None) -> dict:
    params = {"evaluation_text": TEXT, **({"gates": gates} if gates else {})}
    return {"format": "gguf", "quantization": quant, "params": params}


# ~35 s on a quiet 2-core machine (three targets made, validated, evaluated on 2 chunks)
def test_quality_reports_and_gates(runtime, tiny_llama_dir, tmp_path):
    source_id = _source(runtime, Path(tiny_llama_dir), tmp_path)
    with runtime.session() as s:
        job = catalog.create_job(s, source_id=source_id, hardware_class="cpu", labels={}, actor="test", request=None,
                                 targets=[_target("F16"), _target("Q8_0", {"max_mean_kl": 1.0, "min_top1": 0.5}),
                                          _target("Q2_K", {"max_mean_kl": 1e-5}),
                                          {"format": "onnx", "quantization": "int8-dynamic",
                                           "params": {"evaluation_text": TEXT}}])
        s.commit()
        job_id = job.id
    dispatched: list[tuple] = []
    run_job(runtime, job_id, lambda *args: dispatched.append(args))
    outcomes = [run_target(runtime, *args) for args in dispatched]
    assert sorted(outcomes) == ["failed", "succeeded", "succeeded"]
    with runtime.session() as s:
        job = catalog.get_job(s, job_id=job_id).to_dict()
        targets = {t["quantization"]: t for t in job["targets"]}
        arts = {q: catalog.get_artifact(s, artifact_id=t["artifact_id"]) for q, t in targets.items() if t["artifact_id"]}
        rows = {q: (a.mean_kl, a.top1_agreement) for q, a in arts.items()}
        arts = {q: a.to_dict() for q, a in arts.items()}

    # the gated Q2_K: failed with its measured numbers, nothing published for it
    q2 = targets["Q2_K"]
    assert q2["status"] == "failed" and q2["artifact_id"] is None and q2["result"] is None
    assert q2["error"]["code"] == "quality_gate_failed"
    assert "mean_kl" in q2["error"]["message"] and "> max_mean_kl 1e-05" in q2["error"]["message"]
    assert not any(f"/{q2['id']}/" in k for k in runtime.store.list_keys("artifacts/"))
    # the loose gate and the ungated float passed, each with its report
    assert targets["Q8_0"]["status"] == targets["F16"]["status"] == "succeeded"
    # independent of the stored one, on the extent the worker scores (Settings.evaluation_chunks)
    ref = compute_eval_reference(Path(tiny_llama_dir), text=TEXT, max_chunks=runtime.settings.evaluation_chunks or None)
    for quant in ("F16", "Q8_0"):
        art = arts[quant]
        quality = art["metrics"]["quality"]
        assert rows[quant] == (quality["mean_kl"], quality["top1_agreement"])  # the columns take the report's
        assert quality["n_tokens"] == ref.n_scored and quality["eval_seconds_per_1k_tokens"] > 0
        path = tmp_path / quant / art["filename"]
        runtime.store.download_file(art["storage_key"], path)
        again = evaluate_gguf(path, ref).to_dict()
        assert again["ppl"] == pytest.approx(quality["ppl"], rel=1e-4)
        assert again["mean_kl"] == pytest.approx(quality["mean_kl"], rel=1e-3, abs=1e-7)
        assert again["top1_agreement"] == pytest.approx(quality["top1_agreement"], abs=1e-9)
        # timed on this worker (llama-bench's tests at the suite's extent), its class recorded
        speed = art["metrics"]["speed"]
        assert (speed["n_prompt"], speed["n_gen"], speed["repetitions"]) == (
            runtime.settings.speed_n_prompt, runtime.settings.speed_n_gen, runtime.settings.speed_repetitions)
        assert speed["pp_tokens_per_s"] > 0 and speed["tg_tokens_per_s"] > 0 and speed["threads"] >= 1
        assert art["metadata"]["made_on"]["hardware_class"] == "cpu"
        # the job itself says what each target cost to evaluate and how fast it runs
        result = targets[quant]["result"]
        assert result["artifact_id"] == art["id"] and result["size_bytes"] == art["size_bytes"]
        assert result["eval_seconds_per_1k_tokens"] == quality["eval_seconds_per_1k_tokens"]
        assert result["mean_kl"] == quality["mean_kl"] and result["ppl_ratio"] == quality["ppl_ratio"]
        assert result["speed"]["tg_tokens_per_s"] == speed["tg_tokens_per_s"]
    assert arts["F16"]["metrics"]["quality"]["ppl_ratio"] == pytest.approx(1.0, abs=1e-3)
    # the ONNX decoder: the same report, onnxruntime against the same source reference
    onnx = arts["int8-dynamic"]["metrics"]["quality"]
    assert onnx["n_tokens"] == ref.n_scored and onnx["ppl_source"] == pytest.approx(ref.source_ppl, rel=1e-5)
    assert onnx["mean_kl"] > 0 and onnx["eval_seconds_per_1k_tokens"] > 0
    assert targets["int8-dynamic"]["result"]["mean_kl"] == onnx["mean_kl"]
    assert arts["Q8_0"]["metrics"]["quality"]["mean_kl"] > arts["F16"]["metrics"]["quality"]["mean_kl"]
