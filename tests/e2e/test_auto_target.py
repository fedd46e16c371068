"""gguf:auto through the worker pipelines (in-process, real SQLite catalog and local store, as
tests/e2e/test_quality_report.py): the target measures presets and mixtures against the stored
evaluation reference, publishes a winner within its size budget, records the frontier in the
artifact's metrics; the downloaded file loads in llama.cpp and, measured independently (a fresh
transformers reference), is no worse than llama.cpp's own Q4_K_M of the budget's size."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from quantyard import catalog
from quantyard.engine import convert, parse_target
from quantyard.engine.evaluation import compute_eval_reference, evaluate_gguf
from quantyard.engine.gguf.ggml_types import FILE_TYPES
from worker.pipeline import run_job
from worker.target_pipeline import run_target

from .test_quality_report import TEXT, _source, runtime  # noqa: F401  (fixture)


def _llama_cpp_q4_k_m(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    import llama_cpp

    f32 = convert(tiny_llama_dir, parse_target("gguf:F32"), tmp_path / "f32").path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FILE_TYPES["Q4_K_M"].llama_ftype, 2
    out = tmp_path / "ref-q4_k_m.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


# ~90 s on a quiet 2-core machine (8 min measured under a load of 12): ~8 candidates made and
# measured on the tiny model, plus the independent reference and llama.cpp's Q4_K_M
@pytest.mark.slow
def test_auto_target_publishes_the_winner_and_its_frontier(runtime, tiny_llama_dir, tmp_path):  # noqa: F811
    ref_q4 = _llama_cpp_q4_k_m(Path(tiny_llama_dir), tmp_path)
    budget = ref_q4.stat().st_size + 2048  # room for our provenance keys
    source_id = _source(runtime, Path(tiny_llama_dir), tmp_path)
    target = {"format": "gguf", "quantization": "auto",
              "params": {"evaluation_text": TEXT, "max_size": budget, "max_candidates": 6,
                         "presets": ["Q8_0", "Q5_K_M", "Q4_K_M", "Q3_K_M"]}}
    with runtime.session() as s:
        job = catalog.create_job(s, source_id=source_id, hardware_class="cpu", labels={}, actor="test",
                                 request=None, targets=[target])
        s.commit()
        job_id = job.id
    dispatched: list[tuple] = []
    run_job(runtime, job_id, lambda *args: dispatched.append(args))
    assert [run_target(runtime, *args) for args in dispatched] == ["succeeded"]
    with runtime.session() as s:
        t = catalog.get_job(s, job_id=job_id).to_dict()["targets"][0]
        art = catalog.get_artifact(s, artifact_id=t["artifact_id"]).to_dict()
    auto = art["metrics"]["auto"]
    assert art["size_bytes"] <= budget
    names = {p["name"] for p in auto["frontier"]}
    assert {"Q4_K_M", "Q3_K_M"} <= names and "Q8_0" not in names  # Q8_0 does not fit: never made
    assert any(p["pareto"] for p in auto["frontier"]) and auto["winner"] in names
    path = tmp_path / "winner.gguf"
    runtime.store.download_file(art["storage_key"], path)
    # independent of the stored one, on the extent the worker scores (Settings.evaluation_chunks)
    ref = compute_eval_reference(Path(tiny_llama_dir), text=TEXT, max_chunks=runtime.settings.evaluation_chunks or None)
    ours = evaluate_gguf(path, ref).mean_kl  # loads and runs in llama.cpp
    assert ours == pytest.approx(art["metrics"]["quality"]["mean_kl"], rel=1e-3, abs=1e-7)
    assert ours <= evaluate_gguf(ref_q4, ref).mean_kl * (1 + 1e-3)


def _run_job(runtime, source_id: str, targets: list[dict]) -> dict:  # noqa: F811
    with runtime.session() as s:
        job = catalog.create_job(s, source_id=source_id, hardware_class="cpu", labels={}, actor="test",
                                 request=None, targets=targets)
        s.commit()
        job_id = job.id
    dispatched: list[tuple] = []
    run_job(runtime, job_id, lambda *args: dispatched.append(args))
    assert all(run_target(runtime, *args) == "succeeded" for args in dispatched)
    with runtime.session() as s:
        return catalog.get_job(s, job_id=job_id).to_dict()


# ~30 s: two presets made by a first job, then an auto target that only ranks presets
def test_auto_target_reuses_the_sources_measured_presets(runtime, tiny_llama_dir, tmp_path):  # noqa: F811
    source_id = _source(runtime, Path(tiny_llama_dir), tmp_path)
    presets = ["Q4_K_M", "Q3_K_M"]
    first = _run_job(runtime, source_id, [{"format": "gguf", "quantization": q, "params": {"evaluation_text": TEXT}}
                                          for q in presets])
    made = {t["quantization"]: t["artifact_id"] for t in first["targets"]}
    # a preset measured on another text is not the same measurement: not reused
    _run_job(runtime, source_id, [{"format": "gguf", "quantization": "Q2_K", "params": {"evaluation_text": TEXT[:3000]}}])
    auto = {"format": "gguf", "quantization": "auto",
            "params": {"evaluation_text": TEXT, "max_size": "1G", "search": False, "presets": presets + ["Q2_K"]}}
    second = _run_job(runtime, source_id, [auto])
    with runtime.session() as s:
        art = catalog.get_artifact(s, artifact_id=second["targets"][0]["artifact_id"]).to_dict()
        firsts = {q: catalog.get_artifact(s, artifact_id=i).to_dict() for q, i in made.items()}
    result = art["metrics"]["auto"]
    points = {p["name"]: p for p in result["frontier"]}
    assert result["measured"] == 1 and set(points) == {"Q4_K_M", "Q3_K_M", "Q2_K"}  # only Q2_K made again
    for q in presets:
        assert points[q]["artifact_id"] == made[q]
        assert points[q]["mean_kl"] == firsts[q]["metrics"]["quality"]["mean_kl"]
    assert points["Q2_K"]["artifact_id"] is None
    winner = points[result["winner"]]  # "accurate" under 1G: the lowest KL of the three
    assert winner["mean_kl"] == min(p["mean_kl"] for p in points.values())
