"""Model card and CycloneDX ML-BOM of a real converted artifact, through the API.

The tiny Llama is uploaded through the API, a job F16 + Q4_K_M is submitted through the API, and
the worker pipeline runs it in this process on the same catalog and store (as
tests/worker/test_pipeline.py does). Then /card and /bom are fetched and checked against the
catalog's own records; the BOM must pass cyclonedx-python-lib's CycloneDX 1.6 schema validation."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import yaml
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from tests.api.conftest import MiB, build_client, make_settings, upload
from tests.api.test_jobs import submit
from worker.pipeline import run_job
from worker.runtime import build_runtime
from worker.target_pipeline import run_target


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llama_dir):
    """One app + catalog + store for the module, with a finished job F16 + Q4_K_M of the tiny
    Llama: (client, {"job", "source"}). Converting once keeps the module fast."""
    settings = make_settings(tmp_path_factory.mktemp("cards") / "data", max_upload_bytes=64 * MiB,
                             max_unpacked_bytes=64 * MiB)
    with build_client(settings) as client:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(tiny_llama_dir, arcname="tiny-llama")
        r = upload(client, buf.getvalue(), name="tiny-llama")
        assert r.status_code == 201, r.text
        source = r.json()
        r = submit(client, source["id"], ["gguf:F16", "gguf:Q4_K_M"])
        assert r.status_code == 202, r.text
        runtime = build_runtime(settings, worker_id="test-worker:cpu")
        dispatched: list[tuple] = []
        assert run_job(runtime, r.json()["id"], lambda *args: dispatched.append(args)) == "dispatched"
        # the F16 is made in the prepare task (the plan's one read of the source), the Q4_K_M in its own
        assert [run_target(runtime, *args) for args in dispatched] == ["succeeded"]
        job = client.get(f"/v1/jobs/{r.json()['id']}").json()
        assert job["status"] == "succeeded" and len(job["intermediate_artifact_ids"]) == 1
        yield client, {"job": job, "source": source}


@pytest.fixture
def client(env):
    return env[0]


@pytest.fixture
def converted(env):
    return env[1]


def _q4(client, job) -> dict:
    arts = [client.get(f"/v1/artifacts/{a}").json() for a in job["artifact_ids"]]
    (q4,) = [a for a in arts if a["quantization"] == "Q4_K_M"]
    return q4


def test_card_of_a_real_artifact(client, converted):
    job, source = converted["job"], converted["source"]
    art = _q4(client, job)
    r = client.get(f"/v1/artifacts/{art['id']}/card")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    card = r.text
    head, sep, body = card.removeprefix("---\n").partition("\n---\n")
    assert card.startswith("---\n") and sep
    meta = yaml.safe_load(head)
    assert (meta["base_model"], meta["base_model_relation"], meta["library_name"]) == (
        "tiny-llama", "quantized", "llama.cpp")
    assert meta["quantyard"]["sha256"] == art["sha256"] and meta["quantyard"]["source_sha256"] == source["sha256"]
    assert meta["quantyard"]["bits_per_weight"] == art["metrics"]["bits_per_weight"]
    (intermediate,) = job["intermediate_artifact_ids"]
    lineage = [line for line in body.splitlines() if line[:3] in ("1. ", "2. ", "3. ")]
    assert [source["id"] in lineage[0], intermediate in lineage[1], art["id"] in lineage[2]] == [True] * 3
    assert art["recipe_hash"] in lineage[2]
    assert f"{art['metrics']['mean_kl']:.6f}" in body and "Q4_K × " in body and "Q6_K × " in body
    assert f"llama-cli -m {art['filename']}" in body
    assert client.get("/v1/artifacts/art_missing/card").status_code == 404


def test_bom_of_a_real_artifact_validates(client, converted):
    job, source = converted["job"], converted["source"]
    art = _q4(client, job)
    r = client.get(f"/v1/artifacts/{art['id']}/bom")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/vnd.cyclonedx+json")
    assert "version=1.6" in r.headers["content-type"]
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(r.text) is None
    bom = r.json()
    (model,) = bom["components"]
    assert model["type"] == "machine-learning-model"
    assert model["hashes"] == [{"alg": "SHA-256", "content": art["sha256"]}]
    ancestors = {a["bom-ref"]: a for a in model["pedigree"]["ancestors"]}
    (intermediate,) = job["intermediate_artifact_ids"]
    inter = client.get(f"/v1/artifacts/{intermediate}").json()
    assert ancestors[f"quantyard:source:{source['id']}"]["hashes"][0]["content"] == source["sha256"]
    assert ancestors[f"quantyard:artifact:{intermediate}"]["hashes"][0]["content"] == inter["sha256"]
    assert len(ancestors) == 2
    perf = {m["type"]: json.loads(m["value"]) for m in model["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]}
    assert perf["mean_kl"] == art["metrics"]["mean_kl"] and perf["top1_agreement"] == art["metrics"]["top1_agreement"]
    tasks = bom["formulation"][0]["workflows"][0]["tasks"]
    assert [t["name"].split()[0] for t in tasks] == ["export", "quantize", "validate"]
    assert [t["name"] for t in tasks[:2]] == ["export gguf:F32", "quantize gguf:Q4_K_M"]
    assert tasks[1]["uid"] == art["recipe_hash"]
    assert {"type": "distribution", "url": f"http://testserver/v1/artifacts/{art['id']}/download"} in model[
        "externalReferences"]
    assert client.get("/v1/artifacts/art_missing/bom").status_code == 404


def test_cli_writes_card_and_bom(client, converted, tmp_path, monkeypatch):
    """`quantyard card` / `quantyard bom` through QuantyardClient, talking to the same app (the
    TestClient is an httpx.Client bound to it)."""
    from click.testing import CliRunner

    from quantyard import cli
    from quantyard.client import QuantyardClient

    art = _q4(client, converted["job"])
    api = QuantyardClient("http://testserver")
    api._http = client
    monkeypatch.setattr(cli, "_client", lambda server: api)
    runner = CliRunner()
    out = tmp_path / "bom.json"
    result = runner.invoke(cli.main, ["bom", art["id"], "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(out.read_text()) is None
    assert json.loads(out.read_text())["components"][0]["hashes"][0]["content"] == art["sha256"]
    result = runner.invoke(cli.main, ["card", art["id"]])
    assert result.exit_code == 0 and result.output.startswith('---\nbase_model: "tiny-llama"\n')
    result = runner.invoke(cli.main, ["card", "art_missing"])
    assert result.exit_code != 0 and "404" in result.output
