"""Retention over HTTP: DELETE (soft) and restore, legal hold (PUT/DELETE), downloads of deleted
artifacts (410), hidden from listings, purge by `quantyard retention purge --now`, audit events."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from quantyard import catalog


@pytest.fixture
def artifact(client, source, tmp_path) -> dict:
    """A real artifact: bytes in the app's store, cataloged under the uploaded source."""
    app = client.app
    path = tmp_path / "tiny-Q8_0.gguf"
    path.write_bytes(b"GGUF" + b"\x01" * 4096)
    stored = app.state.store.put_file("artifacts/manual/tiny-Q8_0.gguf", path)
    with app.state.session_factory.begin() as s:
        art = catalog.record_artifact(
            s, job_id=None, target_id=None, source_id=source["id"], format="gguf", quantization="Q8_0",
            sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri, storage_key=stored.key,
            filename=path.name, metrics={}, metadata={}, engine_version="e", recipe={}, recipe_hash="f" * 64,
            actor="test")
        return art.to_dict()


def _listed(client, **params) -> set[str]:
    r = client.get("/v1/artifacts", params=params)
    assert r.status_code == 200, r.text
    return {a["id"] for a in r.json()["items"]}


def _events(client, artifact_id) -> list[tuple[str, str]]:
    with client.app.state.session_factory() as s:
        return [(e.action, e.outcome) for e in reversed(
            catalog.audit_events(s, resource_type="artifact", resource_id=artifact_id))]


def test_delete_hides_refuses_download_and_restore_undoes_it(client, artifact):
    aid = artifact["id"]
    r = client.request("DELETE", f"/v1/artifacts/{aid}", json={"reason": "superseded by v2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["deleted"] is True and body["deletion"]["reason"] == "superseded by v2"
    assert body["deletion"]["purge_after"] > body["deletion"]["at"] and body["derived_artifacts"] == []
    assert aid not in _listed(client) and aid in _listed(client, include_deleted="true")
    assert client.get(f"/v1/artifacts/{aid}").json()["deleted"] is True  # metadata stays readable
    r = client.get(f"/v1/artifacts/{aid}/download")
    assert r.status_code == 410 and r.json()["error"]["code"] == "deleted"

    r = client.post(f"/v1/artifacts/{aid}/restore")
    assert r.status_code == 200 and r.json()["deleted"] is False
    r = client.get(f"/v1/artifacts/{aid}/download")
    assert r.status_code == 200 and r.content == b"GGUF" + b"\x01" * 4096
    r = client.post(f"/v1/artifacts/{aid}/restore")
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_deleted"
    assert client.request("DELETE", "/v1/artifacts/art_nope").status_code == 404
    assert [a for a, o in _events(client, aid) if o == "success"] == [
        "artifact.create", "artifact.delete", "artifact.restore", "artifact.download"]


def test_legal_hold_blocks_delete_until_released(client, artifact):
    aid = artifact["id"]
    r = client.put(f"/v1/artifacts/{aid}/legal-hold", json={"reason": "case 42"})
    assert r.status_code == 200 and r.json()["legal_hold"]["reason"] == "case 42"
    r = client.request("DELETE", f"/v1/artifacts/{aid}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "legal_hold"
    assert client.put(f"/v1/artifacts/{aid}/legal-hold", json={"reason": ""}).status_code == 422
    r = client.request("DELETE", f"/v1/artifacts/{aid}/legal-hold", json={"reason": "settled"})
    assert r.status_code == 200 and r.json()["legal_hold"] is None
    assert client.request("DELETE", f"/v1/artifacts/{aid}").status_code == 200
    assert _events(client, aid)[1:] == [
        ("artifact.legal_hold", "success"), ("artifact.delete", "failure"),
        ("artifact.legal_hold_release", "success"), ("artifact.delete", "success")]


def test_cli_purge_now_removes_the_bytes(client, artifact, settings, monkeypatch):
    from quantyard.cli import main
    from quantyard.settings import get_settings

    aid, store = artifact["id"], client.app.state.store
    assert client.request("DELETE", f"/v1/artifacts/{aid}").status_code == 200
    monkeypatch.setenv("QUANTYARD_DATA_DIR", str(settings.data_dir))
    for name in ("QUANTYARD_DATABASE_URL", "QUANTYARD_STORAGE_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["retention", "purge"])  # within the grace period: nothing
        assert result.exit_code == 0 and store.stat(artifact["storage_key"]) is not None, result.output
        result = CliRunner().invoke(main, ["retention", "purge", "--now", "--json"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert aid in result.output and store.stat(artifact["storage_key"]) is None
    r = client.post(f"/v1/artifacts/{aid}/restore")
    assert r.status_code == 410 and r.json()["error"]["code"] == "purged"
    r = client.put(f"/v1/artifacts/{aid}/legal-hold", json={"reason": "too late"})
    assert r.status_code == 410
    assert client.get(f"/v1/artifacts/{aid}").json()["deletion"]["purged_at"] is not None
    assert ("artifact.purge", "success") in _events(client, aid)
