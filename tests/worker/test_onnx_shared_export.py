"""A job's ONNX targets on a Hugging Face source share one fp32 export (made in the prepare stage,
published as an artifact with its recipe hash, reused across jobs), through the real pipelines
in-process (SQLite catalog, local store, a tiny random BERT, onnxruntime and transformers)."""

from __future__ import annotations

import tarfile

import pytest

from quantyard import catalog
from quantyard.engine.manifest import ENGINE_VERSION
from quantyard.engine.onnx.heldout import HELDOUT_SENTENCES
from quantyard.engine.spec import TargetSpec
from tests.worker.test_pipeline import _get, _objects, _run, runtime  # noqa: F401
from worker.publish import target_recipe


@pytest.fixture
def exports(monkeypatch) -> list[str]:
    """Every fp32 export the engine runs, recorded; the real export still runs."""
    from quantyard.engine.onnx import convert

    calls: list[str] = []
    real = convert.export_optimized

    def recording(loaded, path, opts, work):
        calls.append(f"opset {opts.opset}")
        return real(loaded, path, opts, work)

    monkeypatch.setattr(convert, "export_optimized", recording)
    return calls


@pytest.fixture
def bert(runtime, tmp_path) -> dict:  # noqa: F811
    pytest.importorskip("onnxruntime")
    from tests.fixtures.onnx_encoders import encoder_model

    archive = tmp_path / "bert.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(encoder_model("BertModel"), arcname="tiny-bert")
    stored = runtime.store.put_file("sources/bert/source.tar.gz", archive)
    with runtime.session() as s:
        source = catalog.create_source(
            s, name="tiny-bert", sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri,
            storage_key=stored.key, architecture="BertModel", metadata={}, actor="test", request=None)
        s.commit()
        return {"id": source.id, "sha256": stored.sha256}


def _job(rt, source_id: str, targets: list[tuple[str, dict]]) -> str:
    with rt.session() as s:
        job = catalog.create_job(s, source_id=source_id, hardware_class="cpu", labels={}, actor="test",
                                 request=None, targets=[{"format": "onnx", "quantization": q, "params": p}
                                                        for q, p in targets])
        s.commit()
        return job.id


def _recipe_hash(bert: dict, quant: str, params: dict | None = None, intermediate: str | None = None) -> str:
    return target_recipe(source_sha256=bert["sha256"], spec=TargetSpec("onnx", quant, params or {}),
                         engine_version=ENGINE_VERSION, inputs={"intermediate_sha256": intermediate})[1]


def _artifacts(rt, job: dict) -> dict[str, dict]:
    with rt.session() as s:
        return {a["quantization"]: a for a in (catalog.get_artifact(s, artifact_id=i).to_dict()
                                               for i in job["artifact_ids"] + job["intermediate_artifact_ids"])}


def test_onnx_targets_share_one_fp32_export_and_a_second_job_reuses_all(runtime, bert, exports):  # noqa: F811
    targets = [("fp32", {}), ("int8-dynamic", {}), ("fp16", {})]
    first = _job(runtime, bert["id"], targets)
    assert _run(runtime, first) == ("dispatched", ["succeeded", "succeeded"])  # fp32 done in prepare
    assert exports == ["opset 17"]  # one export for the three targets
    job = _get(runtime, first)
    assert job["status"] == "succeeded" and job["intermediate_artifact_ids"] == []  # fp32 IS the export
    arts = _artifacts(runtime, job)
    fp32 = arts["fp32"]
    assert fp32["target_id"] is None and job["targets"][0]["artifact_id"] == fp32["id"]
    assert fp32["recipe_hash"] == _recipe_hash(bert, "fp32")  # = a plain onnx:fp32 made alone
    with runtime.session() as s:
        for quant in ("int8-dynamic", "fp16"):
            art = arts[quant]
            up = catalog.lineage(s, artifact_id=art["id"])["upstream"]
            assert (up[0]["type"], up[0]["id"]) == ("artifact", fp32["id"])
            assert (up[-1]["type"], up[-1]["id"]) == ("source", bert["id"])
            assert art["recipe_hash"] == _recipe_hash(bert, quant, intermediate=fp32["sha256"])
            assert art["metrics"]["fp32_size_bytes"] == fp32["size_bytes"]
            # the encoder's report on the held-apart sentences (engine/onnx/heldout.py)
            held = art["metrics"]["heldout"]
            assert held["sentences"] == len(HELDOUT_SENTENCES) and held["worst_sentence"] in HELDOUT_SENTENCES
            assert 0.9 < held["cosine_min"] <= held["cosine_mean"] <= 1.0 + 1e-6
    for art in arts.values():  # each validated against transformers on the source
        m = art["metrics"]
        assert m["samples"] >= 4 and m["max_abs_diff"] <= m["tolerance_max_abs_diff"]
        assert m["cosine_min"] >= m["tolerance_min_cosine"] and m["latency_ms_p50"] > 0
    assert 0.45 < arts["fp16"]["size_bytes"] / fp32["size_bytes"] < 0.55
    keys = sorted(_objects(runtime))
    assert keys == sorted(a["storage_key"] for a in arts.values()) and len(keys) == 3
    assert any("/onnx-fp32/" in k for k in keys)

    second = _job(runtime, bert["id"], targets)
    assert _run(runtime, second) == ("succeeded", [])  # recognised before the source is fetched
    again = _get(runtime, second)
    assert [t["reused"] for t in again["targets"]] == [True, True, True]
    assert again["artifact_ids"] == job["artifact_ids"]
    assert sorted(_objects(runtime)) == keys and exports == ["opset 17"]


def test_the_export_alone_is_an_intermediate_and_other_opsets_convert_alone(runtime, bert, exports):  # noqa: F811
    first = _job(runtime, bert["id"], [("fp16", {}), ("int8-dynamic", {}), ("int8-dynamic", {"opset": 18})])
    assert _run(runtime, first) == ("dispatched", ["succeeded"] * 3)
    assert sorted(exports) == ["opset 17", "opset 18"]  # shared at opset 17; the opset-18 one alone
    job = _get(runtime, first)
    (export_id,) = job["intermediate_artifact_ids"]
    with runtime.session() as s:
        fp16, int8, int8_18, export = (catalog.get_artifact(s, artifact_id=i).to_dict()
                                       for i in job["artifact_ids"] + [export_id])
    assert export["quantization"] == "fp32" and export["target_id"] is None
    assert fp16["recipe_hash"] == _recipe_hash(bert, "fp16", intermediate=export["sha256"])
    assert int8["recipe_hash"] == _recipe_hash(bert, "int8-dynamic", intermediate=export["sha256"])
    assert int8_18["recipe_hash"] == _recipe_hash(bert, "int8-dynamic", {"opset": 18})  # from the source

    # A later job asking for the plain fp32 gets the export itself, without fetching the source.
    second = _job(runtime, bert["id"], [("fp32", {})])
    assert _run(runtime, second) == ("succeeded", [])
    (target,) = _get(runtime, second)["targets"]
    assert target["reused"] and target["artifact_id"] == export_id and target["estimate"] is None
    assert len(exports) == 2


def test_which_targets_can_share_an_export(tmp_path, tiny_llama_dir):
    """The engine names the export a target is quantized from: the opset is all that matters, a
    source kind's default opset is left out (encoders 17, decoders 18), program sources share
    nothing (they convert whole, per target), GGUF targets have no ONNX export."""
    from quantyard import engine
    from tests.fixtures.onnx_encoders import encoder_model

    def spec(source, quant, **params):
        found = engine.onnx_fp32_spec(source, TargetSpec("onnx", quant, params))
        return None if found is None else found.params

    bert = encoder_model("BertModel")
    assert spec(bert, "int4") == spec(bert, "fp16", opset=17, block_size=64) == {}
    assert spec(bert, "int8-dynamic", opset=18) == {"opset": 18}
    assert spec(tiny_llama_dir, "int4") == spec(tiny_llama_dir, "fp16", opset=18) == {}
    assert spec(tiny_llama_dir, "int4", opset=17) == {"opset": 17}
    assert engine.onnx_fp32_spec(bert, TargetSpec("gguf", "Q8_0")) is None
    program = tmp_path / "program"
    program.mkdir()
    (program / "model.onnx").write_bytes(b"")  # a program source is told by its file name alone
    assert spec(program, "int8-dynamic") is None
