"""POST /v1/sources and GET /v1/sources/{id}: streaming upload, safety checks, size caps."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import func, select

from quantyard.catalog.models import AuditEvent, Source
from tests.api import archives
from tests.api.conftest import MiB, build_client, make_settings, upload


def source_count(app) -> int:
    with app.state.session_factory() as s:
        return s.scalar(select(func.count()).select_from(Source))


def stored_keys(app) -> list[str]:
    return [k for k in app.state.store.list_keys("sources/")]


def test_upload_ok(client, app):
    data = archives.model_tar_gz()
    r = upload(client, data, name="tiny-llama")
    assert r.status_code == 201, r.text
    body = r.json()
    digest = hashlib.sha256(data).hexdigest()
    assert body["sha256"] == digest
    assert body["size_bytes"] == len(data)
    assert body["name"] == "tiny-llama"
    assert body["architecture"] == "LlamaForCausalLM"
    assert body["id"].startswith("src_")
    assert r.headers["location"] == f"/v1/sources/{body['id']}"
    key = f"sources/{digest}/source.tar.gz"
    assert app.state.store.stat(key) == len(data)
    assert b"".join(app.state.store.iter_bytes(key)) == data
    assert body["uri"].endswith(key)

    got = client.get(f"/v1/sources/{body['id']}")
    assert got.status_code == 200
    assert got.json()["sha256"] == digest


def test_upload_records_audit_with_request_id(client, app):
    r = upload(client, archives.model_tar_gz(), headers={"X-Request-ID": "req-abc-123"})
    assert r.status_code == 201, r.text
    assert r.headers["x-request-id"] == "req-abc-123"
    with app.state.session_factory() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.resource_id == r.json()["id"])).all()
    assert events and events[0].request_id == "req-abc-123"
    # The actor is the principal behind the API key, the organisation its tenant.
    assert events[0].actor == "test-admin" and events[0].organization_id == "org_default"


def test_request_id_generated_when_absent(client):
    r = client.get("/healthz")
    assert len(r.headers["x-request-id"]) >= 16


@pytest.mark.parametrize("builder,ctype,ext", [
    (archives.model_tar, "application/x-tar", "tar"),
    (archives.model_zip, "application/zip", "zip"),
])
def test_upload_tar_and_zip(client, app, builder, ctype, ext):
    data = builder()
    r = upload(client, data, content_type=ctype)
    assert r.status_code == 201, r.text
    digest = hashlib.sha256(data).hexdigest()
    assert app.state.store.stat(f"sources/{digest}/source.{ext}") == len(data)


def test_upload_model_in_a_top_folder(client):
    r = upload(client, archives.model_tar_gz(prefix="tiny-llama/"), name=None)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "tiny-llama"
    assert r.json()["architecture"] == "LlamaForCausalLM"


def _assert_refused(client, app, r, code, member=None):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code
    if member:
        assert member in err["message"]
    assert stored_keys(app) == []
    assert source_count(app) == 0


def test_traversal_member_refused(client, app):
    r = upload(client, archives.traversal_tar_gz())
    _assert_refused(client, app, r, "unsafe_archive", "../evil.txt")
    assert r.json()["error"]["details"]["member"] == "../evil.txt"


def test_symlink_member_refused(client, app):
    r = upload(client, archives.symlink_tar_gz())
    _assert_refused(client, app, r, "unsafe_archive", "weights.bin")
    assert "symbolic link" in r.json()["error"]["message"]


def test_zip_with_absolute_path_refused(client, app):
    r = upload(client, archives.absolute_zip(), content_type="application/zip")
    _assert_refused(client, app, r, "unsafe_archive", "/etc/cron.d/evil")


def test_refusal_is_audited(client, app):
    upload(client, archives.traversal_tar_gz())
    with app.state.session_factory() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "source.create")).all()
    assert [e.outcome for e in ev] == ["failure"]
    assert ev[0].details["code"] == "unsafe_archive"


def test_missing_config_is_invalid_model(client, app):
    r = upload(client, archives.model_tar_gz({"model.safetensors": b"x" * 10}))
    _assert_refused(client, app, r, "invalid_model", "config.json")


def test_not_an_archive(client, app):
    r = upload(client, b"definitely not an archive" * 10)
    _assert_refused(client, app, r, "invalid_archive")


def test_unsupported_content_type(client, app):
    r = upload(client, archives.model_tar_gz(), content_type="text/plain")
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"


def test_oversize_by_content_length(tmp_path):
    settings = make_settings(tmp_path / "d", max_upload_bytes=1000)
    with build_client(settings) as client:
        r = upload(client, b"\x1f\x8b" + b"\x00" * 5000)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"
        assert stored_keys(client.app) == [] and source_count(client.app) == 0


def test_oversize_stream_without_content_length(tmp_path):
    settings = make_settings(tmp_path / "d", max_upload_bytes=64 * 1024)

    def chunks():  # a generator body is sent chunked: no Content-Length
        for _ in range(20):
            yield b"\x00" * 16384

    with build_client(settings) as client:
        r = client.post("/v1/sources", content=chunks(), headers={"Content-Type": "application/gzip"})
        assert r.status_code == 413, r.text
        assert stored_keys(client.app) == [] and source_count(client.app) == 0
        leftovers = list((settings.data_dir / "tmp" / "uploads").iterdir())
        assert leftovers == []


def test_too_many_members(tmp_path):
    settings = make_settings(tmp_path / "d", max_archive_members=2)
    with build_client(settings) as client:
        r = upload(client, archives.model_tar_gz())
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsafe_archive"


def test_unpacked_size_cap(tmp_path):
    settings = make_settings(tmp_path / "d", max_unpacked_bytes=MiB)
    with build_client(settings) as client:
        files = archives.model_files()
        files["model.safetensors"] = b"\x00" * (2 * MiB)  # compresses to almost nothing
        r = upload(client, archives.model_tar_gz(files))
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsafe_archive"


def test_multipart_files(client, app):
    files = [("files", (name, data, "application/octet-stream")) for name, data in archives.model_files().items()]
    r = client.post("/v1/sources", files=files, params={"name": "from-files"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["architecture"] == "LlamaForCausalLM"
    assert app.state.store.stat(f"sources/{body['sha256']}/source.tar") == body["size_bytes"]


def test_multipart_traversal_filename(client, app):
    files = [("files", (name, data, "application/octet-stream")) for name, data in archives.model_files().items()]
    files.append(("files", ("../../x", b"x", "application/octet-stream")))
    r = client.post("/v1/sources", files=files)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "unsafe_archive"


def test_get_unknown_source(client):
    r = client.get("/v1/sources/src_nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "source_not_found"


def test_same_bytes_twice_share_the_object(client, app):
    data = archives.model_tar_gz()
    a = upload(client, data, name="a").json()
    b = upload(client, data, name="b").json()
    assert a["id"] != b["id"] and a["sha256"] == b["sha256"] and a["uri"] == b["uri"]
    assert len(stored_keys(app)) == 1


def test_auto_migrate(tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.api.conftest import make_key

    settings = make_settings(tmp_path / "fresh")
    app = create_app(settings, auto_migrate=True)  # the catalog exists once the app is made
    headers = {"Authorization": f"Bearer {make_key(settings)[1]}"}
    with TestClient(app, headers=headers) as client:
        assert upload(client, archives.model_tar_gz()).status_code == 201
