"""Validation that cannot be fooled (issue 10): a source whose tensors do not all land in the
model its config.json describes, or whose model would keep any randomly initialised parameter,
or that holds NaN/Inf, is `invalid_model` naming the file and the tensors, for ONNX and GGUF
targets alike, and nothing is written. Before, a LlamaForCausalLM config over GPT-2 tensors
converted to onnx:fp32 and passed validation against transformers' random initialisation, and a
NaN source published a BF16 intermediate with NaN metrics that broke the tenant's listings.

Engine-level cases run each hostile folder through `engine.convert`; the last case sends two of
them through a real embedded stack and checks the tenant's listings still answer 200."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from quantyard.engine import ConversionError, convert, parse_target
from tests.engine.test_strict_load import (
    llama_config_over_gpt2,
    tampered_copy,
    with_value,
)
from tests.fixtures.models import arch_model

QPROJ = "model.layers.0.self_attn.q_proj.weight"


def _extra(t):
    import torch

    t["model.layers.1.backdoor.weight"] = torch.ones(8, 8)
    return t


def _missing(t):
    del t["model.layers.1.mlp.down_proj.weight"]
    return t


def _renamed(t):
    t["model.layers.0.self_attn.q_projection.weight"] = t.pop(QPROJ)
    return t


# case -> (builder of the hostile folder, a tensor name the error must quote per target format)
CASES = {
    "llama-config-over-gpt2": (lambda d: llama_config_over_gpt2(d),
                               {"onnx": "transformer.h.0.attn.c_attn", "gguf": "transformer.h.0.attn.c_attn"}),
    "extra-tensor": (lambda d: tampered_copy(arch_model("llama"), d, _extra),
                     {"onnx": "model.layers.1.backdoor.weight", "gguf": "model.layers.1.backdoor.weight"}),
    "missing-tensor": (lambda d: tampered_copy(arch_model("llama"), d, _missing),
                       {"onnx": "model.layers.1.mlp.down_proj.weight", "gguf": "blk.1.ffn_down.weight"}),
    "renamed-tensor": (lambda d: tampered_copy(arch_model("llama"), d, _renamed),
                       {"onnx": "q_projection.weight", "gguf": "q_projection.weight"}),
    "nan-tensor": (lambda d: tampered_copy(arch_model("llama"), d, with_value(QPROJ, float("nan"))),
                   {"onnx": QPROJ, "gguf": QPROJ}),
    "inf-tensor": (lambda d: tampered_copy(arch_model("llama"), d, with_value(QPROJ, float("inf"))),
                   {"onnx": QPROJ, "gguf": QPROJ}),
}


@pytest.mark.parametrize("target", ["onnx:fp32", "gguf:F16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fooling_source_is_invalid_model_naming_the_tensor(tmp_path, case, target):
    build, expected = CASES[case]
    src = build(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert(src, parse_target(target), out)
    e = err.value
    assert e.code == "invalid_model", (e.code, e.message)
    assert expected[target.split(":")[0]] in e.message, e.message
    assert "model.safetensors" in e.message or e.details.get("file") == "model.safetensors", e.message
    assert str(tmp_path) not in e.message  # no server paths
    json.dumps(e.to_dict())  # the job's error column takes it as is
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert written == [], written


def test_classifier_config_over_base_model_tensors_is_refused(minilm_dir, tmp_path):
    """BertForSequenceClassification over a BertModel checkpoint: the classifier head would be
    random, and its ONNX export would match that random head perfectly."""
    src = tampered_copy(minilm_dir, tmp_path / "src", config=lambda c: {
        **c, "architectures": ["BertForSequenceClassification"], "num_labels": 2})
    with pytest.raises(ConversionError) as err:
        convert(src, parse_target("onnx:fp32"), tmp_path / "out")
    assert err.value.code == "invalid_model" and "classifier" in err.value.message


def test_legitimate_tied_and_buffered_models_still_convert(tmp_path):
    """The refusals above must not catch real layouts: GPT-2 (tied head) and Qwen2 (tied head,
    q/k/v biases) convert to gguf:F16 and validate."""
    for family in ("gpt2", "qwen2"):
        result = convert(arch_model(family), parse_target("gguf:F16"), tmp_path / family)
        assert result.metrics["mean_kl"] < 1e-3


def _tar_gz(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return buf.getvalue()


@pytest.mark.parametrize("case, targets", [("nan-tensor", ["gguf:BF16", "gguf:Q4_K_M"]),
                                           ("llama-config-over-gpt2", ["onnx:fp32"])])
def test_through_the_service_nothing_is_published_and_listings_answer(hostile_stack, tmp_path, case, targets):
    src = CASES[case][0](tmp_path / "src")
    before = hostile_stack.objects()
    with hostile_stack.stack.client() as client:
        up = client.post("/v1/sources", params={"name": case}, content=_tar_gz(src),
                         headers={"Content-Type": "application/gzip"})
        assert up.status_code == 201, up.text
        created = client.post("/v1/jobs", json={"source": up.json()["id"], "targets": targets})
        assert created.status_code == 202, created.text
        from tests.e2e.conftest import wait_for_job

        job, _ = wait_for_job(client, created.json()["id"], timeout_s=300)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "invalid_model", job["error"]
        assert CASES[case][1]["gguf" if targets[0].startswith("gguf") else "onnx"] in job["error"]["message"]
        assert job["artifact_ids"] == [] and job.get("intermediate_artifact_ids", []) == []
        listing = client.get("/v1/artifacts")
        assert listing.status_code == 200, listing.text
        assert client.get("/v1/jobs", params={"limit": 50}).status_code == 200
    # the upload itself and audit anchors are expected; no artifact, intermediate or temp object
    new = {o for o in hostile_stack.objects() - before if not o.startswith("sources/")}
    assert new == set(), new
    assert _work_left(hostile_stack.scratch) == []


def _work_left(scratch: Path, timeout_s: float = 10.0) -> list[str]:
    """job_* / tgt_* folders still inside the worker processes' own scratch folders (those
    per-process folders live as long as their process; worker/scratch.py)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        left = [f"{p.parent.name}/{p.name}" for p in scratch.glob("*/*")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_catalog_stores_non_finite_metrics_as_null(catalog_url):
    """The catalog's own guarantee, whatever an engine or a future converter returns: a NaN or
    infinite metric is stored as null and every stored record is strict JSON."""
    from sqlalchemy import select

    from quantyard import catalog
    from quantyard.catalog import Artifact

    eng = catalog.make_engine(catalog_url)
    try:
        factory = catalog.make_session_factory(eng)
        with factory.begin() as s:
            source = catalog.create_source(s, name="nan", sha256="a" * 64, size_bytes=1, uri="file:///x/s",
                                           storage_key="sources/a/s", actor="key:test")
            catalog.record_artifact(
                s, job_id=None, target_id=None, source_id=source.id, format="gguf", quantization="BF16",
                sha256="b" * 64, size_bytes=1, uri="file:///x/a", storage_key="artifacts/b/a", filename="a.gguf",
                metrics={"mean_kl": float("nan"), "max_kl": float("inf"), "top1_agreement": 1.0,
                         "per_prompt": [0.5, float("-inf")]},
                metadata={"nested": {"x": float("nan")}}, engine_version="0", recipe={}, recipe_hash="c" * 64)
        with factory() as s:
            art = s.execute(select(Artifact)).scalars().one()
            assert art.metrics == {"mean_kl": None, "max_kl": None, "top1_agreement": 1.0, "per_prompt": [0.5, None]}
            assert art.meta == {"nested": {"x": None}}
            json.dumps(art.metrics, allow_nan=False)
            rows, _ = catalog.list_artifacts(s)
            assert [r.id for r in rows] == [art.id]
    finally:
        eng.dispose()
