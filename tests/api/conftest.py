"""API test fixtures: create_app on a temp SQLite catalog, a local store in tmp and the embedded
filesystem broker (Settings(data_dir=tmp_path)); real components, no mocks.

Authentication stays on (the default): ``build_client`` makes a real admin key in the default
organisation and sends it with every request (``client.api_key``); tests/api/test_auth_matrix.py
covers the other roles and tenants."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from quantyard import catalog
from quantyard.settings import Settings
from tests.api import archives

MiB = 1 << 20


def make_settings(data_dir: Path, **overrides) -> Settings:
    # Explicit None values win over any QUANTYARD_* variables set in the environment.
    values = dict(data_dir=data_dir, database_url=None, broker_url=None, storage_url=None,
                  s3_endpoint_url=None, max_upload_bytes=4 * MiB, max_unpacked_bytes=16 * MiB,
                  max_archive_members=100)
    values.update(overrides)
    return Settings(**values)


def make_key(settings: Settings, *, role: str = "admin", org: str = "default", name: str | None = None,
             expires_at=None) -> tuple[str, str]:
    """A real API key straight in the catalog: (key id, secret)."""
    engine = catalog.make_engine(settings.resolved_database_url)
    try:
        with catalog.make_session_factory(engine).begin() as s:
            organization = catalog.ensure_organization(s, name=org, actor="test-setup")
            key, secret = catalog.create_api_key(s, organization_id=organization.id, name=name or f"{org}-{role}",
                                                 role=role, actor="test-setup", expires_at=expires_at)
            return key.id, secret
    finally:
        engine.dispose()


def build_client(settings: Settings, *, migrate: bool = True, role: str = "admin", **app_kwargs) -> TestClient:
    """A TestClient that sends a fresh key of ``role`` in the default organisation (role=None: no key)."""
    from api.app import create_app

    if migrate:
        catalog.upgrade_database(settings.resolved_database_url)
    app = create_app(settings, **app_kwargs)
    headers, secret = {}, None
    if role is not None and settings.auth == "required":
        secret = make_key(settings, role=role, name="test-admin" if role == "admin" else None)[1]
        headers["Authorization"] = f"Bearer {secret}"
    client = TestClient(app, raise_server_exceptions=False, headers=headers)
    client.api_key = secret
    return client


@pytest.fixture
def settings(tmp_path) -> Settings:
    return make_settings(tmp_path / "data")


@pytest.fixture
def client(settings):
    with build_client(settings) as c:
        yield c


@pytest.fixture
def app(client):
    return client.app


@pytest.fixture
def session(app):
    with app.state.session_factory() as s:
        yield s


def upload(client: TestClient, data: bytes, *, content_type="application/gzip", name="tiny", headers=None, **kw):
    params = {"name": name} if name else {}
    headers = {"Content-Type": content_type, **(headers or {})}
    return client.post("/v1/sources", content=data, headers=headers, params=params, **kw)


@pytest.fixture
def source(client) -> dict:
    r = upload(client, archives.model_tar_gz())
    assert r.status_code == 201, r.text
    return r.json()


def broker_messages(settings: Settings) -> list[dict]:
    """The messages waiting in the embedded filesystem broker, decoded."""
    out = []
    for path in sorted((settings.broker_folder / "queue").glob("*.msg")):
        msg = json.loads(path.read_text())
        body = msg.get("body")
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body).decode()
        out.append({"path": path, "headers": msg.get("headers", {}), "body": json.loads(body),
                    "routing_key": msg.get("properties", {}).get("delivery_info", {}).get("routing_key")})
    return out


@pytest.fixture
def any_db_client(catalog_url, tmp_path):
    """A client on a fresh migrated catalog, parametrised SQLite / Postgres (tests/fixtures/services.py)."""
    with build_client(make_settings(tmp_path / "data", database_url=catalog_url), migrate=False) as c:
        yield c
