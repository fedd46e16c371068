"""API keys: lifecycle over the API and the CLI, hashing, expiry, the bootstrap key of `quantyard
serve`, and QUANTYARD_AUTH=disabled refused off loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from quantyard import catalog
from quantyard.catalog.models import ApiKey, AuditEvent, utcnow
from tests.api.conftest import make_key

REPO = Path(__file__).resolve().parents[2]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_key_lifecycle_over_the_api(client, app):
    r = client.post("/v1/keys", json={"name": "ci-pipeline", "role": "submitter", "expires_in_days": 30})
    assert r.status_code == 201, r.text
    made = r.json()
    secret = made["secret"]
    assert secret.startswith("qy_") and made["key_prefix"] == secret[:10] and made["role"] == "submitter"
    assert r.headers["cache-control"] == "no-store" and made["expires_at"]

    # Works at once, as a submitter (can read, cannot manage keys).
    assert client.get("/v1/jobs", headers=bearer(secret)).status_code == 200
    assert client.get("/v1/keys", headers=bearer(secret)).status_code == 403

    listed = client.get("/v1/keys").json()["items"]
    mine = next(k for k in listed if k["id"] == made["id"])
    assert "secret" not in mine and "key_hash" not in mine and mine["last_used_at"] is not None
    assert secret not in client.get("/v1/keys").text

    # Only the hash is stored.
    with app.state.session_factory() as s:
        row = s.get(ApiKey, made["id"])
        assert row.key_hash == catalog.identity.hash_secret(secret) and secret not in str(vars(row))

    r = client.delete(f"/v1/keys/{made['id']}")
    assert r.status_code == 200 and r.json()["revoked_at"]
    r = client.get("/v1/jobs", headers=bearer(secret))
    assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"]
    assert client.delete(f"/v1/keys/{made['id']}").status_code == 200  # idempotent
    assert client.delete("/v1/keys/key_nope").status_code == 404

    with app.state.session_factory() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.resource_id == made["id"]))
        actions = [(e.action, e.actor) for e in events]
    assert actions == [("key.create", "test-admin"), ("key.revoke", "test-admin")]


def test_key_requests_are_validated(client):
    assert client.post("/v1/keys", json={"name": "x", "role": "root"}).status_code == 422
    assert client.post("/v1/keys", json={"name": "", "role": "viewer"}).status_code == 422
    assert client.post("/v1/keys", json={"name": "x", "role": "viewer", "expires_in_days": 0}).status_code == 422


def test_only_the_operator_makes_keys_in_another_organisation(client, settings):
    # The test client is an admin of the default organisation: the operator.
    r = client.post("/v1/keys", json={"name": "first-admin", "role": "admin", "organization": "initech"})
    assert r.status_code == 201 and r.json()["organization"] == "initech"
    tenant_admin = r.json()["secret"]
    r = client.post("/v1/keys", json={"name": "x", "role": "admin", "organization": "default"},
                    headers=bearer(tenant_admin))
    assert r.status_code == 403
    # In its own organisation it may.
    r = client.post("/v1/keys", json={"name": "dev", "role": "viewer"}, headers=bearer(tenant_admin))
    assert r.status_code == 201 and r.json()["organization"] == "initech"
    # And it sees and revokes only its own organisation's keys.
    assert {k["organization"] for k in client.get("/v1/keys", headers=bearer(tenant_admin)).json()["items"]} == \
        {"initech"}
    default_key = client.get("/v1/keys").json()["items"][0]["id"]
    assert client.delete(f"/v1/keys/{default_key}", headers=bearer(tenant_admin)).status_code == 404


def test_authenticate_expiry_revocation_and_last_used(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    catalog.upgrade_database(url)
    factory = catalog.make_session_factory(catalog.make_engine(url))
    with factory.begin() as s:
        org = catalog.create_organization(s, name="acme", actor="t")
        key, secret = catalog.create_api_key(s, organization_id=org.id, name="bob", role="maintainer", actor="t",
                                             expires_at=utcnow() + timedelta(hours=1))
    with factory.begin() as s:
        p = catalog.authenticate(s, secret=secret)
        assert (p.organization_id, p.name, p.role, p.key_id) == (org.id, "bob", "maintainer", key.id)
        assert p.has_role("submitter") and not p.has_role("admin")
        assert catalog.authenticate(s, secret=secret, now=utcnow() + timedelta(hours=2)) is None  # expired
        assert catalog.authenticate(s, secret=secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
        assert catalog.authenticate(s, secret="") is None and catalog.authenticate(s, secret="Bearer x") is None
    with factory() as s:
        assert s.get(ApiKey, key.id).last_used_at is not None
    with factory.begin() as s:
        catalog.revoke_api_key(s, key_id=key.id, actor="t")
    with factory.begin() as s:
        assert catalog.authenticate(s, secret=secret) is None
        assert [k.id for k in catalog.list_api_keys(s, organization_id=org.id, include_revoked=False)] == []
    with factory() as s:
        assert catalog.verify_audit_chain(s).ok


def _cli(args, env, timeout=60):
    return subprocess.run([sys.executable, "-m", "quantyard.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _env(tmp_path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTYARD_")}
    env.update(QUANTYARD_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(REPO), **extra)
    return env


def test_cli_keys_create_list_revoke(tmp_path):
    env = _env(tmp_path)
    made = _cli(["keys", "create", "--org", "acme", "--role", "admin", "--name", "ops", "--expires-in", "30d"], env)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("qy_") and "not shown again" in made.stderr
    listed = _cli(["keys", "list"], env)
    assert listed.returncode == 0 and "ops" in listed.stdout and "acme" in listed.stdout
    assert secret not in listed.stdout and secret[:10] in listed.stdout
    key_id = listed.stdout.split()[0]
    assert _cli(["keys", "revoke", key_id], env).returncode == 0
    assert "revoked" in _cli(["keys", "list"], env).stdout
    bad = _cli(["keys", "create", "--role", "admin", "--name", "x", "--expires-in", "soon"], env)
    assert bad.returncode != 0 and "--expires-in" in bad.stderr


def test_cli_client_sends_the_api_key(tmp_path):
    """`quantyard status` against a live API: 401 without QUANTYARD_API_KEY, fine with it."""
    env = _env(tmp_path)
    secret = _cli(["keys", "create", "--role", "viewer", "--name", "v"], env).stdout.strip()
    port = _free_port()
    api = subprocess.Popen([sys.executable, "-m", "quantyard.cli", "api", "--port", str(port)], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_port(port)
        server = f"http://127.0.0.1:{port}"
        without = _cli(["status", "job_x", "--server", server], env)
        assert without.returncode != 0 and "401" in without.stderr
        with_key = _cli(["status", "job_x", "--server", server], {**env, "QUANTYARD_API_KEY": secret})
        assert with_key.returncode != 0 and "404" in with_key.stderr  # authenticated: the job is just missing
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(timeout=20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port}")


def _serve_output(env, port: int) -> str:
    """Start `quantyard serve`, wait until it listens, stop it; its stdout."""
    proc = subprocess.Popen([sys.executable, "-m", "quantyard.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_port(port)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    return out


def test_serve_prints_a_bootstrap_admin_key_once(tmp_path):
    env = _env(tmp_path)
    first = _serve_output(env, _free_port())
    secret = next(line.split("=", 1)[1] for line in first.splitlines() if "QUANTYARD_API_KEY=" in line)
    assert "bootstrap admin key" in first
    second = _serve_output(env, _free_port())
    assert "QUANTYARD_API_KEY" not in second and secret not in second
    # It is a working admin key of the default organisation.
    url = f"sqlite:///{tmp_path / 'data' / 'catalog.db'}"
    factory = catalog.make_session_factory(catalog.make_engine(url))
    with factory() as s:
        p = catalog.authenticate(s, secret=secret)
    assert p is not None and p.role == "admin" and p.organization_name == "default"


def test_disabled_auth_is_refused_off_loopback_and_announced_on_it(tmp_path):
    env = _env(tmp_path, QUANTYARD_AUTH="disabled")
    for args in (["serve", "--host", "0.0.0.0"], ["api", "--host", "10.1.2.3"]):
        r = _cli([*args, "--port", str(_free_port())], env)
        assert r.returncode != 0 and "QUANTYARD_AUTH=disabled is refused" in r.stderr, r.stderr
    out = _serve_output(env, _free_port())
    assert "authentication DISABLED" in out and "QUANTYARD_API_KEY" not in out


def test_loopback_detection():
    from quantyard.cli import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))


def test_make_key_helper_keys_work(client, settings):
    # The fixtures' key helper makes real keys: another role in another organisation.
    _, secret = make_key(settings, role="viewer", org="other")
    assert client.get("/v1/jobs", headers=bearer(secret)).json()["items"] == []
