"""Model cards and CycloneDX ML-BOMs from catalog records (quantyard.cards).

The records are made with the real catalog functions on SQLite (record_artifact, lineage), so the
dicts have exactly the catalog's shape; the BOM is checked by cyclonedx-python-lib's JSON schema
validator for CycloneDX 1.6, and tampered BOMs must fail it."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from quantyard import catalog
from quantyard.cards import ml_bom, model_card
from quantyard.recipes import make_recipe, recipe_hash

ENGINE = "quantyard-engine/0.1.0"


def schema_error(bom: dict):
    """None when `bom` is valid CycloneDX 1.6, else the validator's error."""
    return JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(bom))


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, sep, _ = card[4:].partition("\n---\n")
    assert sep, "front matter is not closed"
    return yaml.safe_load(head)


@pytest.fixture
def factory(tmp_path):
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog.upgrade_database(url)
    engine = catalog.make_engine(url)
    yield catalog.make_session_factory(engine)
    engine.dispose()


def _artifact(s, source, *, fmt, quant, sha, parents, metrics=None, metadata=None, params=None, inputs=None):
    recipe = make_recipe(source_sha256=source.sha256, engine_version=ENGINE,
                         target={"format": fmt, "quantization": quant, "params": params or {}})
    recipe.update(inputs or {})
    return catalog.record_artifact(
        s, job_id=None, target_id=None, source_id=source.id, format=fmt, quantization=quant, sha256=sha,
        size_bytes=1000, uri=f"file:///x/{sha[:8]}", storage_key=f"artifacts/{sha[:8]}", filename=f"m-{quant}.{fmt}",
        metrics=metrics or {}, metadata=metadata or {}, engine_version=ENGINE, recipe=recipe,
        recipe_hash=recipe_hash(recipe), actor="test", parents=parents)


GGUF_METRICS = {"mean_kl": 0.0291, "max_kl": 0.2, "top1_agreement": 0.93, "probe_tokens": 86,
                "bits_per_weight": 4.8912, "size_bytes": 1000, "tokenization_match": True}
MADE_ON = {"worker_id": "w1:cpu", "hardware_class": "cpu", "machine": "x86_64", "cpu_count": 2,
           "cpu_flags": ["avx2", "fma"]}


@pytest.fixture
def gguf_chain(factory):
    """source -> F32 intermediate -> (imatrix from the source) -> IQ4_XS artifact."""
    with factory.begin() as s:
        source = catalog.create_source(
            s, name="smol", sha256="a" * 64, size_bytes=10, uri="file:///x/s", storage_key="sources/s",
            architecture="LlamaForCausalLM", metadata={"base_model": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M"},
            actor="test")
        inter = _artifact(s, source, fmt="gguf", quant="F32", sha="b" * 64, parents=[("source", source.id)])
        imat = _artifact(s, source, fmt="imatrix", quant="imatrix", sha="c" * 64, parents=[("source", source.id)],
                         params={"calibration": "default"})
        art = _artifact(
            s, source, fmt="gguf", quant="IQ4_XS", sha="d" * 64,
            parents=[("artifact", inter.id), ("artifact", imat.id)], metrics=GGUF_METRICS,
            metadata={"tensor_types": {"IQ4_XS": 13, "F32": 5, "Q6_K": 1}, "fallbacks": ["blk.0.ffn_down.weight"],
                      "imatrix": {"file": "smol-imatrix.gguf", "dataset": "calibration.txt", "entries_count": 14,
                                  "chunks_count": 3, "sha256": "c" * 64}, "made_on": MADE_ON},
            inputs={"intermediate_sha256": "b" * 64, "imatrix_sha256": "c" * 64})
        ids = {"source": source.id, "intermediate": inter.id, "imatrix": imat.id, "artifact": art.id}
    with factory() as s:
        return (ids, catalog.get_artifact(s, artifact_id=ids["artifact"]).to_dict(),
                catalog.get_source(s, source_id=ids["source"]).to_dict(), catalog.lineage(s, artifact_id=ids["artifact"]))


@pytest.fixture
def onnx_artifact(factory):
    with factory.begin() as s:
        source = catalog.create_source(
            s, name="minilm", sha256="e" * 64, size_bytes=10, uri="file:///x/m", storage_key="sources/m",
            architecture="BertModel", metadata={}, actor="test")
        art = _artifact(
            s, source, fmt="onnx", quant="int8-dynamic", sha="f" * 64, parents=None,
            metrics={"max_abs_diff": 0.42, "cosine_min": 0.9931, "cosine_of": "mean-pooled sentence embeddings",
                     "latency_ms_p50": 3.25, "latency_ms_p90": 4.5, "throughput_seq_per_s": 812.0,
                     "compression_vs_fp32": 3.7, "size_bytes": 1000,
                     "heldout": {"sentences": 46, "batch": 1, "cosine_min": 0.99817, "cosine_mean": 0.99952,
                                 "token_cosine_min": 0.9871, "max_abs_diff": 0.051, "worst_sentence": "x"}},
            metadata={"task": "feature-extraction", "architecture": "BertModel",
                      "inputs": ["input_ids", "attention_mask", "token_type_ids"], "opset": 17,
                      "quantization": {"per_channel": True, "smooth_alpha": 0.5}, "made_on": MADE_ON})
    with factory() as s:
        return (catalog.get_artifact(s, artifact_id=art.id).to_dict(),
                catalog.get_source(s, source_id=source.id).to_dict(), catalog.lineage(s, artifact_id=art.id))


def test_gguf_card_front_matter_and_body(gguf_chain):
    ids, art, src, graph = gguf_chain
    card = model_card(art, src, graph)
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["base_model_relation"] == "quantized" and meta["library_name"] == "llama.cpp"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"gguf", "quantized", "IQ4_XS", "imatrix"} <= set(meta["tags"])
    assert meta["quantyard"]["sha256"] == "d" * 64 and meta["quantyard"]["source_sha256"] == "a" * 64
    assert meta["quantyard"]["bits_per_weight"] == 4.8912
    # the lineage, farthest first, each with its id and sha256; the quantize step with its recipe
    lines = [line for line in card.splitlines() if line[:3] in ("1. ", "2. ", "3. ", "4. ")]
    kinds = ("source", "intermediate", "imatrix", "artifact")
    assert [ids[k] in line for k, line in zip(kinds, lines, strict=False)] == [True] * 4
    assert art["recipe_hash"] in lines[3] and "b" * 64 in lines[1]
    for text in ("| mean KL divergence vs source | 0.029100 |", "| top-1 token agreement with source | 93.00% |",
                 "IQ4_XS × 13", "blk.0.ffn_down.weight", "entries_count `14`", "llama-cli -m m-IQ4_XS.gguf",
                 "hardware class `cpu`", ENGINE):
        assert text in card, text


def test_onnx_card(onnx_artifact):
    art, src, graph = onnx_artifact
    card = model_card(art, src, graph)
    meta = front_matter(card)
    assert (meta["base_model"], meta["library_name"], meta["pipeline_tag"]) == ("minilm", "onnxruntime",
                                                                               "feature-extraction")
    for text in ("| latency p50 (ms) | 3.250 |", "| compression vs fp32 | 3.70x |", "| quantizer per_channel | True |",
                 "Made and timed on hardware class `cpu`", "ort.InferenceSession(\"m-int8-dynamic.onnx\"",
                 "cosine of: mean-pooled sentence embeddings", "Importance matrix: none",
                 "| worst cosine vs PyTorch on held-apart sentences | 0.998170 |", "| held-apart sentences | 46 |"):
        assert text in card, text


def test_front_matter_survives_hostile_names(onnx_artifact):
    art, src, graph = onnx_artifact
    src = dict(src, name='evil"\n---\nlicense: mit\n# x: [')
    meta = front_matter(model_card(art, src, graph))
    assert meta["base_model"] == src["name"] and "license" not in meta


def _refs(bom: dict) -> tuple[list[str], list[str]]:
    """Every bom-ref defined, and every ref used (resources, task dependencies)."""
    defined, used = [], []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "bom-ref":
                    defined.append(v)
                elif k == "resource":
                    used.append(v["ref"])
                elif k == "taskDependencies":
                    used.extend(r for d in v for r in [d["ref"], *d.get("dependsOn", [])])
                walk(v)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(bom)
    return defined, used


def test_gguf_bom_validates_and_carries_the_pedigree(gguf_chain):
    ids, art, src, graph = gguf_chain
    bom = ml_bom(art, src, graph)
    assert schema_error(bom) is None
    assert (bom["bomFormat"], bom["specVersion"]) == ("CycloneDX", "1.6")
    assert bom["metadata"]["tools"]["components"][0]["version"] == "0.1.0"
    (model,) = bom["components"]
    assert model["type"] == "machine-learning-model"
    assert model["hashes"] == [{"alg": "SHA-256", "content": "d" * 64}]
    ancestors = {a["bom-ref"]: a for a in model["pedigree"]["ancestors"]}
    assert {f"quantyard:source:{ids['source']}", f"quantyard:artifact:{ids['intermediate']}",
            f"quantyard:artifact:{ids['imatrix']}"} == set(ancestors)
    source = ancestors[f"quantyard:source:{ids['source']}"]
    assert source["hashes"][0]["content"] == "a" * 64 and source["type"] == "machine-learning-model"
    assert source["purl"] == "pkg:huggingface/HuggingFaceTB/SmolLM2-135M"
    assert ancestors[f"quantyard:artifact:{ids['imatrix']}"]["type"] == "data"
    params = model["modelCard"]["modelParameters"]
    assert (params["task"], params["modelArchitecture"]) == ("text-generation", "LlamaForCausalLM")
    perf = {m["type"]: m["value"] for m in model["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]}
    assert json.loads(perf["mean_kl"]) == 0.0291 and json.loads(perf["bits_per_weight"]) == 4.8912
    (workflow,) = bom["formulation"][0]["workflows"]
    assert [t["name"].split()[0] for t in workflow["tasks"]] == ["export", "imatrix", "quantize", "validate"]
    quantize = workflow["tasks"][2]
    assert {i["resource"]["ref"] for i in quantize["inputs"] if "resource" in i} == {
        f"quantyard:artifact:{ids['intermediate']}", f"quantyard:artifact:{ids['imatrix']}"}
    params = {p["name"]: p["value"] for i in quantize["inputs"] for p in i.get("parameters", [])}
    assert params["quantization"] == "IQ4_XS" and params["imatrix_sha256"] == "c" * 64
    defined, used = _refs(bom)
    assert len(defined) == len(set(defined)), "bom-refs must be unique"
    assert used and set(used) <= set(defined), "every reference must resolve"


def test_onnx_bom_validates(onnx_artifact):
    art, src, graph = onnx_artifact
    bom = ml_bom(art, src, graph, timestamp="2026-01-02T03:04:05Z", base_url="http://q.example/")
    assert schema_error(bom) is None
    model = bom["components"][0]
    assert [a["hashes"][0]["content"] for a in model["pedigree"]["ancestors"]] == ["e" * 64]
    assert {"type": "distribution", "url": f"http://q.example/v1/artifacts/{art['id']}/download"} in model[
        "externalReferences"]
    tasks = bom["formulation"][0]["workflows"][0]["tasks"]
    assert [t["name"].split()[0] for t in tasks] == ["convert", "validate"]
    assert json.loads(tasks[1]["outputs"][0]["data"]["content"])["latency_ms_p50"] == 3.25
    perf = {m["type"]: m for m in model["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]}
    assert json.loads(perf["quality.heldout_cosine_min"]["value"]) == 0.99817
    assert perf["quality.heldout_cosine_min"]["slice"].startswith("46 held-apart sentences")
    assert bom["metadata"]["timestamp"] == "2026-01-02T03:04:05Z"
    assert ml_bom(art, src, graph) == ml_bom(art, src, graph)  # same inputs, same document


@pytest.mark.parametrize("tamper", [
    lambda b: b["components"][0]["hashes"][0].update(content="d" * 63),  # wrong hash length
    lambda b: b["components"][0]["hashes"][0].update(alg="SHA256"),  # not a CycloneDX algorithm name
    lambda b: b["formulation"][0]["workflows"][0]["tasks"][0].pop("bom-ref"),  # a task without its bom-ref
    lambda b: b["components"][0].update(type="model"),
    lambda b: b["metadata"].update(timestamp="yesterday"),
    lambda b: b.update(serialNumber="not-a-urn"),
    lambda b: b["components"][0]["modelCard"]["quantitativeAnalysis"]["performanceMetrics"][0].update(value=0.1),
    lambda b: b["components"][0]["pedigree"]["ancestors"][0].pop("name"),
], ids=["hash-length", "hash-alg", "task-bom-ref", "component-type", "timestamp", "serial", "metric-number",
        "ancestor-name"])
def test_tampered_bom_fails_validation(gguf_chain, tamper):
    _, art, src, graph = gguf_chain
    bom = ml_bom(art, src, graph)
    assert schema_error(bom) is None
    bad = copy.deepcopy(bom)
    tamper(bad)
    assert bad != bom and schema_error(bad) is not None


def test_cards_import_nothing_heavy():
    code = ("import sys, quantyard.cards; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'sqlalchemy', 'fastapi', 'pydantic', 'torch', 'numpy', 'httpx', 'yaml', 'cyclonedx', 'quantyard.catalog'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
