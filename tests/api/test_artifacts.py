"""Artifact catalog over the local store: list, get, download (streamed + audited), lineage."""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from quantyard import catalog
from quantyard.catalog.models import AuditEvent
from tests.api.test_jobs import submit


def make_artifact(client, app, tmp_path, source, quantization="Q8_0", payload=b"GGUF" + b"\x01" * 5000):
    job = submit(client, source["id"], [f"gguf:{quantization}"]).json()
    target = job["targets"][0]
    path = tmp_path / f"model-{quantization}.gguf"
    path.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    stored = app.state.store.put_file(f"artifacts/{digest}/{path.name}", path)
    with app.state.session_factory() as s:
        art = catalog.record_artifact(
            s, job_id=job["id"], target_id=target["id"], source_id=source["id"], format="gguf",
            quantization=quantization, sha256=digest, size_bytes=len(payload), uri=stored.uri,
            storage_key=stored.key, filename=path.name, metrics={"top1_agreement": 0.99},
            metadata={"architecture": "LlamaForCausalLM"}, engine_version="test",
            recipe={"input_sha256": source["sha256"], "target": target}, recipe_hash="r" * 64)
        s.commit()
        return art.to_dict(), payload


def test_list_get_download_lineage(client, app, tmp_path, source):
    a, payload = make_artifact(client, app, tmp_path, source, "Q8_0")
    b, _ = make_artifact(client, app, tmp_path, source, "F16", b"GGUF" + b"\x02" * 100)

    items = client.get("/v1/artifacts").json()["items"]
    assert {i["id"] for i in items} == {a["id"], b["id"]}
    only = client.get("/v1/artifacts", params={"quantization": "Q8_0"}).json()["items"]
    assert [i["id"] for i in only] == [a["id"]]
    by_source = client.get("/v1/artifacts", params={"source": source["id"], "format": "gguf"}).json()
    assert len(by_source["items"]) == 2
    page = client.get("/v1/artifacts", params={"limit": 1}).json()
    assert len(page["items"]) == 1 and page["next_cursor"]

    got = client.get(f"/v1/artifacts/{a['id']}")
    assert got.status_code == 200
    meta = got.json()
    assert meta["sha256"] == a["sha256"] and meta["metrics"] == {"top1_agreement": 0.99}
    assert "lineage" in meta

    r = client.get(f"/v1/artifacts/{a['id']}/download")
    assert r.status_code == 200
    assert r.content == payload
    assert r.headers["content-length"] == str(len(payload))
    assert "attachment" in r.headers["content-disposition"]
    assert "model-Q8_0.gguf" in r.headers["content-disposition"]
    with app.state.session_factory() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "artifact.download")).all()
    assert [e.resource_id for e in events] == [a["id"]]

    lin = client.get(f"/v1/artifacts/{a['id']}/lineage")
    assert lin.status_code == 200
    assert "upstream" in lin.json() and "downstream" in lin.json()
    assert source["id"] in str(lin.json()["upstream"])

    job = client.get(f"/v1/jobs/{a['job_id']}").json()
    assert a["id"] in job["artifact_ids"]


def test_unknown_artifact(client):
    for path in ("/v1/artifacts/art_nope", "/v1/artifacts/art_nope/download", "/v1/artifacts/art_nope/lineage"):
        r = client.get(path)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "artifact_not_found"


def test_missing_bytes(client, app, tmp_path, source):
    a, _ = make_artifact(client, app, tmp_path, source)
    app.state.store.delete(a["storage_key"])
    r = client.get(f"/v1/artifacts/{a['id']}/download")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "object_missing"


def test_download_redirects_to_presigned_url_on_s3(s3_server, tmp_path):
    import httpx

    from tests.api import archives
    from tests.api.conftest import build_client, make_settings, upload

    store = s3_server.open_store()
    settings = make_settings(tmp_path / "d", storage_url=store.url, s3_endpoint_url=s3_server.endpoint_url)
    with build_client(settings, store=store) as client:
        src = upload(client, archives.model_tar_gz())
        assert src.status_code == 201, src.text
        assert src.json()["uri"].startswith("s3://")
        a, payload = make_artifact(client, client.app, tmp_path, src.json())
        r = client.get(f"/v1/artifacts/{a['id']}/download", follow_redirects=False)
        assert r.status_code == 307
        url = r.headers["location"]
        assert url.startswith(s3_server.endpoint_url)
        assert httpx.get(url).content == payload
        assert client.get("/readyz").json()["checks"]["storage"] == "ok"


def test_companion_files_download_by_name(client, app, tmp_path, source):
    """An artifact with external data / later shards: ?file= fetches each by its name, with its
    own sha256; a name the artifact doesn't have is a 404 listing the files it has."""
    a, payload = make_artifact(client, app, tmp_path, source, "Q8_0")
    extra = b"\x07" * 3000
    data = tmp_path / "model-Q8_0.gguf.data"
    data.write_bytes(extra)
    stored = app.state.store.put_file(f"artifacts/x/{data.name}", data)
    with app.state.session_factory() as s:
        art = catalog.get_artifact(s, artifact_id=a["id"])
        art.meta = {**art.meta, "companion_files": [
            {"name": data.name, "key": stored.key, "sha256": stored.sha256, "size_bytes": len(extra)}]}
        s.commit()
    main = client.get(f"/v1/artifacts/{a['id']}/download", params={"file": a["filename"]})
    assert main.status_code == 200 and main.content == payload
    got = client.get(f"/v1/artifacts/{a['id']}/download", params={"file": data.name})
    assert got.status_code == 200 and got.content == extra
    assert got.headers["x-content-sha256"] == hashlib.sha256(extra).hexdigest()
    assert data.name in got.headers["content-disposition"]
    missing = client.get(f"/v1/artifacts/{a['id']}/download", params={"file": "../../etc/passwd"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "file_not_found" and data.name in missing.json()["error"]["message"]
