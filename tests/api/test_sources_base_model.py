"""POST /v1/sources?base_model=: the Hugging Face repo an uploaded model comes from, kept as the
source's metadata.base_model ("org/name") and named by the model card's front matter and the
ML-BOM's pedigree; bad values are a 400 naming base_model, refused before the body is stored;
`quantyard submit --base-model` sends it."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import func, select

from quantyard import catalog, cli
from quantyard.catalog.models import AuditEvent, Source
from quantyard.client import QuantyardClient
from tests.api import archives
from tests.api.conftest import upload


def _upload(client, base_model, data=None):
    data = archives.model_tar_gz() if data is None else data
    return client.post("/v1/sources", content=data, headers={"Content-Type": "application/gzip"},
                       params={"name": "my-finetune", "base_model": base_model})


@pytest.mark.parametrize("given", [
    "Qwen/Qwen2.5-0.5B-Instruct",
    "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct",
    "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/",
    " Qwen/Qwen2.5-0.5B-Instruct ",
])
def test_base_model_is_kept_as_org_name(client, given):
    r = _upload(client, given)
    assert r.status_code == 201, r.text
    assert r.json()["metadata"]["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert r.json()["name"] == "my-finetune"
    got = client.get(f"/v1/sources/{r.json()['id']}").json()
    assert got["metadata"]["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    created = [json.loads(line) for line in client.get("/v1/audit").text.splitlines()]
    created = [e for e in created if e["action"] == "source.create" and e["resource_id"] == got["id"]]
    assert created[-1]["details"]["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"  # audited with the upload


def test_without_base_model_the_metadata_has_none(client, source):
    assert "base_model" not in source["metadata"]


@pytest.mark.parametrize("bad", [
    "llama", "https://example.com/org/name", "https://huggingface.co/org/name/tree/main",
    "https://huggingface.co/datasets/squad", "org/name with space", "org/../etc", "/org/name", "org/name/extra",
])
def test_bad_base_model_is_400_naming_it_and_nothing_is_stored(client, bad):
    r = _upload(client, bad)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_base_model" and "base_model" in err["message"] and repr(bad) in err["message"]
    with client.app.state.session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Source)) == 0
        refused = s.scalars(select(AuditEvent).where(AuditEvent.action == "source.create")).all()
    assert [e.outcome for e in refused] == ["failure"]
    assert client.app.state.store.list_keys("sources/") == []


def test_too_long_base_model_is_refused(client):
    r = _upload(client, "org/" + "n" * 400)
    assert r.status_code == 422 and "base_model" in r.json()["error"]["message"]


def _artifact_of(client, source: dict, tmp_path) -> dict:
    """An artifact of the source as a worker records it (bytes in the store, lineage edge from the
    source); the conversion itself is covered by tests/api/test_cards.py."""
    path = tmp_path / "my-finetune-Q8_0.gguf"
    path.write_bytes(b"GGUF" + b"\x02" * 2048)
    stored = client.app.state.store.put_file("artifacts/manual/my-finetune-Q8_0.gguf", path)
    with client.app.state.session_factory.begin() as s:
        art = catalog.record_artifact(
            s, job_id=None, target_id=None, source_id=source["id"], format="gguf", quantization="Q8_0",
            sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri, storage_key=stored.key,
            filename=path.name, metrics={"mean_kl": 0.001}, metadata={}, engine_version="quantyard-engine/0.1.0",
            recipe={"target": {"format": "gguf", "quantization": "Q8_0", "params": {}}}, recipe_hash="a" * 64,
            actor="test")
        return art.to_dict()


def _front_matter(card: str) -> dict:
    head, sep, _ = card.removeprefix("---\n").partition("\n---\n")
    assert card.startswith("---\n") and sep, card[:200]
    return yaml.safe_load(head)


def test_card_and_bom_name_the_base_model(client, tmp_path):
    r = _upload(client, "https://huggingface.co/HuggingFaceTB/SmolLM2-135M")
    assert r.status_code == 201, r.text
    source = r.json()
    art = _artifact_of(client, source, tmp_path)

    card = client.get(f"/v1/artifacts/{art['id']}/card")
    assert card.status_code == 200, card.text
    meta = _front_matter(card.text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and meta["base_model_relation"] == "quantized"
    assert meta["quantyard"]["base_model_repo"] == "HuggingFaceTB/SmolLM2-135M"

    bom = client.get(f"/v1/artifacts/{art['id']}/bom")
    assert bom.status_code == 200, bom.text
    (model,) = bom.json()["components"]
    (src,) = [a for a in model["pedigree"]["ancestors"] if a["bom-ref"] == f"quantyard:source:{source['id']}"]
    assert src["purl"] == "pkg:huggingface/HuggingFaceTB/SmolLM2-135M"
    assert {"type": "model-card", "url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M"} in src[
        "externalReferences"]
    props = {p["name"]: p["value"] for p in src["properties"]}
    assert props["quantyard:base_model"] == "HuggingFaceTB/SmolLM2-135M", props


def test_without_base_model_the_card_falls_back_on_the_source_name(client, tmp_path):
    source = upload(client, archives.model_tar_gz(), name="my-finetune").json()
    meta = _front_matter(client.get(f"/v1/artifacts/{_artifact_of(client, source, tmp_path)['id']}/card").text)
    assert meta["base_model"] == "my-finetune" and "base_model_repo" not in meta["quantyard"]


def _cli(client, monkeypatch):
    api = QuantyardClient("http://testserver")
    api._http = client  # the TestClient is an httpx.Client bound to the app
    monkeypatch.setattr(cli, "_client", lambda server: api)
    return lambda *args: CliRunner().invoke(cli.main, list(args))


def test_cli_submit_sends_base_model(client, monkeypatch, tmp_path):
    run = _cli(client, monkeypatch)
    archive = tmp_path / "my-finetune.tar.gz"
    archive.write_bytes(archives.model_tar_gz())
    result = run("submit", str(archive), "--target", "gguf:Q8_0", "--json",
                 "--base-model", "https://huggingface.co/meta-llama/Llama-3.2-1B")
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    source = client.get(f"/v1/sources/{job['source_id']}").json()
    assert source["metadata"]["base_model"] == "meta-llama/Llama-3.2-1B" and source["name"] == "my-finetune"

    result = run("submit", str(archive), "--target", "gguf:Q8_0", "--base-model", "not a repo")
    assert result.exit_code == 1 and "400 invalid_base_model" in result.output and "base_model" in result.output
    result = run("submit", job["source_id"], "--target", "gguf:Q8_0", "--base-model", "org/name")
    assert result.exit_code == 2 and "--base-model" in result.output  # a registered source: nothing uploaded
