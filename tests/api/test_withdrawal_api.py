"""The lineage and withdrawal endpoints over HTTP: parameters, errors, the download refusal and
its maintainer override (the three-generation pipeline test is tests/catalog/test_withdrawal.py)."""

from __future__ import annotations

import pytest

from api.deps import caller_may_use_withdrawn
from quantyard import catalog
from quantyard.catalog.models import DEFAULT_ORGANIZATION_ID
from tests.api.conftest import build_client, make_settings


@pytest.fixture
def client(tmp_path):
    with build_client(make_settings(tmp_path / "data", auth="disabled")) as c:
        yield c


@pytest.fixture
def chain(client, tmp_path):
    """source -> F16 -> Q8_0, with bytes in the store."""
    store = client.app.state.store
    ids = {}
    with client.app.state.session_factory() as s:
        src = catalog.create_source(s, name="m", sha256="b" * 64, size_bytes=1, uri="file:///m", storage_key="m",
                                    actor="key:test", organization_id=DEFAULT_ORGANIZATION_ID)
        parents = None
        for quant in ("F16", "Q8_0"):
            path = tmp_path / f"m-{quant}.gguf"
            path.write_bytes(quant.encode() * 100)
            stored = store.put_file(f"artifacts/{quant}/m-{quant}.gguf", path)
            recipe = {"input_sha256": src.sha256, "converter": "gguf", "engine_version": "e/1",
                      "target": {"format": "gguf", "quantization": quant, "params": {}}}
            art = catalog.record_artifact(
                s, job_id=None, target_id=None, source_id=src.id, format="gguf", quantization=quant,
                sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri, storage_key=stored.key,
                filename=path.name, metrics={}, metadata={}, engine_version="e/1", recipe=recipe,
                recipe_hash=stored.sha256, parents=parents)
            parents = [("artifact", art.id)]
            ids[quant] = art.id
        ids["source"] = src.id
        s.commit()
    return ids


def test_lineage_endpoints_take_direction_and_depth(client, chain):
    r = client.get(f"/v1/artifacts/{chain['Q8_0']}/lineage", params={"direction": "upstream", "depth": 1})
    assert r.status_code == 200
    body = r.json()
    assert [n["id"] for n in body["upstream"]] == [chain["F16"]] and body["downstream"] == []
    assert body["edges"][0]["made_by"]["quantization"] == "Q8_0"
    full = client.get(f"/v1/artifacts/{chain['Q8_0']}/lineage").json()
    assert [n["id"] for n in full["upstream"]] == [chain["F16"], chain["source"]]
    down = client.get(f"/v1/sources/{chain['source']}/lineage", params={"direction": "downstream"}).json()
    assert [(n["id"], n["depth"]) for n in down["downstream"]] == [(chain["F16"], 1), (chain["Q8_0"], 2)]
    for params in ({"direction": "sideways"}, {"depth": 0}, {"depth": 101}):
        r = client.get(f"/v1/artifacts/{chain['Q8_0']}/lineage", params=params)
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    assert client.get("/v1/sources/src_nope/lineage").status_code == 404
    assert client.get("/v1/artifacts/art_nope/lineage").status_code == 404


def test_withdraw_an_artifact(client, chain):
    url = f"/v1/artifacts/{chain['F16']}/withdraw"
    assert client.post(url, json={}).status_code == 422
    assert client.post(url, json={"reason": ""}).status_code == 422
    assert client.post("/v1/artifacts/art_nope/withdraw", json={"reason": "x"}).status_code == 404
    r = client.post(url, json={"reason": "wrong tokenizer"})
    assert r.status_code == 200
    assert [f["id"] for f in r.json()["flagged"]] == [chain["Q8_0"]]

    q8 = client.get(f"/v1/artifacts/{chain['Q8_0']}").json()
    assert q8["withdrawn"] is True and q8["withdrawal"]["root"] == {"type": "artifact", "id": chain["F16"]}
    r = client.get(f"/v1/sources/{chain['source']}")
    assert "withdrawn" in r.json() and r.json()["withdrawn"] is False, r.text
    assert client.get("/v1/artifacts").json()["items"] == []
    assert len(client.get("/v1/artifacts?include_withdrawn=true").json()["items"]) == 2

    r = client.get(f"/v1/artifacts/{chain['Q8_0']}/download")
    assert r.status_code == 410 and r.json()["error"]["code"] == "withdrawn"
    assert chain["F16"] in r.json()["error"]["message"] and "wrong tokenizer" in r.json()["error"]["message"]
    assert client.get(f"/v1/artifacts/{chain['Q8_0']}/download?allow_withdrawn=true").content == b"Q8_0" * 100

    # The role decision comes from a dependency (authentication fills it): a non-maintainer is refused.
    client.app.dependency_overrides[caller_may_use_withdrawn] = lambda: False
    try:
        r = client.get(f"/v1/artifacts/{chain['Q8_0']}/download?allow_withdrawn=true")
        assert r.status_code == 403 and r.json()["error"]["details"]["reason"] == "wrong tokenizer"
    finally:
        client.app.dependency_overrides.clear()

    with client.app.state.session_factory() as s:
        events = [(e.action, e.resource_id, e.outcome) for e in catalog.audit_events(s)]
    assert events.count(("artifact.withdraw", chain["F16"], "success")) == 1
    assert events.count(("artifact.withdrawn", chain["Q8_0"], "success")) == 1
    assert ("artifact.withdraw", "art_nope", "failure") in events  # the refused one, too
    assert ("artifact.download", chain["Q8_0"], "success") in events


def test_python_client_withdraws_and_reads_lineage(client, chain):
    from quantyard.client import ApiError, QuantyardClient

    qc = QuantyardClient("http://testserver")
    qc._http = client  # the TestClient is an httpx.Client bound to the app
    graph = qc.lineage("source", chain["source"], direction="downstream", depth=1)
    assert [n["id"] for n in graph["downstream"]] == [chain["F16"]]
    result = qc.withdraw("source", chain["source"], reason="recalled")
    assert {f["id"] for f in result["flagged"]} == {chain["F16"], chain["Q8_0"]}
    with pytest.raises(ApiError) as refused:
        qc.create_job(source=chain["source"], targets=["gguf:Q8_0"])
    assert refused.value.status == 422 and refused.value.code == "source_withdrawn"
    assert "recalled" in str(refused.value)
