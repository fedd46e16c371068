"""Every endpoint x caller (no key, a bad, expired or revoked key, each role) x tenant (own, other),
asserting the exact status code; plus what the scoping hides in listings and in the audit trail.

The endpoint list comes from the app itself (every route it serves, in the schema or not): a route
added without an entry in ENDPOINTS or PUBLIC fails ``test_every_route_is_in_the_matrix``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from quantyard import catalog
from quantyard.catalog.models import utcnow
from tests.api.conftest import build_client, make_key, make_settings

ROLES = ("viewer", "submitter", "maintainer", "admin")
BAD_CALLERS = ("none", "invalid", "expired", "revoked")
# Health probes, and the two static pages that hold no data (their requests carry the key).
PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/"), ("GET", "/docs")}


@dataclass
class Endpoint:
    role: str  # the least role that may call it
    ok: int  # its status for an allowed caller on its own organisation's resource
    body: dict | None = None
    params: dict = field(default_factory=dict)
    mutates: bool = False  # needs fresh resources per call
    prepare: str | None = None  # what to do to the fresh artifact first: "delete", "withdraw", "withdraw-source"
    # Where another tenant's resource is named: "path", "body" (POST /v1/jobs' source), or None
    # (nothing to name: the "other" case is the same call, and must answer the same).
    tenant: str | None = "path"
    # Only for the operator's (default) organisation, whatever the role (the callers here are
    # another organisation's: 403 for every role).
    operator: bool = False


ENDPOINTS: dict[tuple[str, str], Endpoint] = {
    ("POST", "/v1/sources"): Endpoint("submitter", 201, mutates=True, tenant=None),
    ("GET", "/v1/sources/{source_id}"): Endpoint("viewer", 200),
    ("GET", "/v1/sources/{source_id}/lineage"): Endpoint("viewer", 200),
    ("GET", "/v1/sources/{source_id}/frontier"): Endpoint("viewer", 200),
    ("POST", "/v1/sources/{source_id}/withdraw"): Endpoint("maintainer", 200, {"reason": "r"}, mutates=True),
    ("POST", "/v1/sources/{source_id}/reinstate"): Endpoint("admin", 200, {"reason": "r"}, mutates=True,
                                                            prepare="withdraw-source"),
    ("POST", "/v1/jobs"): Endpoint("submitter", 202, mutates=True, tenant="body"),
    ("GET", "/v1/jobs"): Endpoint("viewer", 200, tenant=None),
    ("GET", "/v1/jobs/{job_id}"): Endpoint("viewer", 200),
    ("POST", "/v1/jobs/{job_id}/cancel"): Endpoint("submitter", 202, mutates=True),  # running: cooperative
    ("GET", "/v1/artifacts"): Endpoint("viewer", 200, tenant=None),
    ("GET", "/v1/artifacts/{artifact_id}"): Endpoint("viewer", 200),
    ("DELETE", "/v1/artifacts/{artifact_id}"): Endpoint("maintainer", 200, mutates=True),
    ("GET", "/v1/artifacts/{artifact_id}/download"): Endpoint("viewer", 200),
    ("GET", "/v1/artifacts/{artifact_id}/lineage"): Endpoint("viewer", 200),
    ("POST", "/v1/artifacts/{artifact_id}/withdraw"): Endpoint("maintainer", 200, {"reason": "r"}, mutates=True),
    ("POST", "/v1/artifacts/{artifact_id}/reinstate"): Endpoint("admin", 200, {"reason": "r"}, mutates=True,
                                                                prepare="withdraw"),
    ("GET", "/v1/artifacts/{artifact_id}/card"): Endpoint("viewer", 200),
    ("GET", "/v1/artifacts/{artifact_id}/bom"): Endpoint("viewer", 200),
    ("POST", "/v1/artifacts/{artifact_id}/restore"): Endpoint("maintainer", 200, mutates=True, prepare="delete"),
    ("PUT", "/v1/artifacts/{artifact_id}/legal-hold"): Endpoint("maintainer", 200, {"reason": "case 7"},
                                                                mutates=True),
    ("DELETE", "/v1/artifacts/{artifact_id}/legal-hold"): Endpoint("admin", 200, mutates=True),
    ("GET", "/v1/audit"): Endpoint("admin", 200, tenant=None),
    ("GET", "/v1/capabilities"): Endpoint("viewer", 200, tenant=None),
    ("GET", "/v1/keys"): Endpoint("admin", 200, tenant=None),
    ("POST", "/v1/keys"): Endpoint("admin", 201, {"name": "ci", "role": "viewer"}, mutates=True, tenant=None),
    ("DELETE", "/v1/keys/{key_id}"): Endpoint("admin", 200, mutates=True),
    ("GET", "/openapi.json"): Endpoint("viewer", 200, tenant=None),
    ("GET", "/metrics"): Endpoint("viewer", 200, tenant=None, operator=True),
}


def tiny_source_archive() -> bytes:
    from tests.api import archives

    return archives.model_tar_gz()


class World:
    """Two organisations (acme: the callers; globex: the other tenant) with keys and resources."""

    def __init__(self, client: TestClient, settings):
        self.client, self.settings = client, settings
        self.app = client.app
        self.secrets: dict[str, str] = {}
        for role in ROLES:
            self.secrets[role] = make_key(settings, role=role, org="acme", name=f"acme-{role}")[1]
        self.secrets["other-admin"] = make_key(settings, role="admin", org="globex", name="globex-admin")[1]
        self.secrets["expired"] = self._expired_key()
        revoked_id, self.secrets["revoked"] = make_key(settings, role="admin", org="acme", name="acme-gone")
        with self.app.state.session_factory.begin() as s:
            catalog.revoke_api_key(s, key_id=revoked_id, actor="test")
        self.secrets["invalid"] = "qy_" + "x" * 43
        self.orgs = {}
        with self.app.state.session_factory() as s:
            for name in ("acme", "globex"):
                self.orgs[name] = catalog.get_organization_by_name(s, name=name).id
        self.shared = {org: self.resources(org) for org in ("acme", "globex")}

    def _expired_key(self) -> str:
        key_id, secret = make_key(self.settings, role="admin", org="acme", name="acme-expired")
        # Keys cannot be made already expired: age this one in the database.
        with self.app.state.session_factory.begin() as s:
            s.get(catalog.models.ApiKey, key_id).expires_at = utcnow() - timedelta(seconds=1)
        return secret

    def headers(self, caller: str) -> dict[str, str]:
        return {} if caller == "none" else {"Authorization": f"Bearer {self.secrets[caller]}"}

    def resources(self, org: str) -> dict[str, str]:
        """A source, a job (submitted by the org's submitter), an artifact with bytes, a key."""
        org_id = self.orgs[org]
        submitter = f"{org}-submitter"
        data = b"GGUF" + org.encode() + utcnow().isoformat().encode()
        store = self.app.state.store
        tmp = Path(self.settings.data_dir) / "tmp-bytes"
        tmp.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        stored = store.put_file(f"artifacts/test/{digest}/m.gguf", tmp)
        with self.app.state.session_factory.begin() as s:
            request = catalog.RequestInfo(organization_id=org_id)
            src = catalog.create_source(s, name=f"{org}-model", sha256=digest, size_bytes=len(data), uri=stored.uri,
                                        storage_key=stored.key, architecture="LlamaForCausalLM", actor=submitter,
                                        request=request)
            job = catalog.create_job(s, source_id=src.id, targets=["gguf:Q8_0"], actor=submitter, request=request)
            art = catalog.record_artifact(
                s, job_id=job.id, target_id=job.targets[0].id, source_id=src.id, format="gguf", quantization="Q8_0",
                sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri, storage_key=stored.key,
                filename="m.gguf", metrics={}, metadata={}, engine_version="t", recipe={}, recipe_hash=digest)
            job.status = "running"  # cancellable, with an artifact
            # ...held by a live worker (a job nobody holds is cancelled at once: 200, not 202)
            job.worker_id, job.lease_expires_at = "worker:test", utcnow() + timedelta(hours=1)
            key, _ = catalog.create_api_key(s, organization_id=org_id, name=f"{org}-spare", role="viewer",
                                            actor="test")
            return {"source_id": src.id, "job_id": job.id, "artifact_id": art.id, "key_id": key.id}

    def prepare(self, endpoint: Endpoint, ids: dict[str, str]) -> None:
        if endpoint.prepare == "delete":
            with self.app.state.session_factory.begin() as s:
                catalog.delete_artifact(s, artifact_id=ids["artifact_id"], actor="test")
        elif endpoint.prepare == "withdraw-source":
            with self.app.state.session_factory.begin() as s:
                catalog.withdraw_source(s, source_id=ids["source_id"], reason="test", actor="test")
        elif endpoint.prepare == "withdraw":
            with self.app.state.session_factory.begin() as s:
                catalog.withdraw_artifact(s, artifact_id=ids["artifact_id"], reason="test", actor="test")


def call(world: World, method: str, path: str, endpoint: Endpoint, caller: str, tenant: str):
    owner = "acme" if tenant == "own" else "globex"
    ids = world.resources(owner) if endpoint.mutates else world.shared[owner]
    world.prepare(endpoint, ids)
    url = path.format(**ids)
    kwargs: dict = {"headers": world.headers(caller), "params": endpoint.params}
    if (method, path) == ("POST", "/v1/sources"):
        kwargs["content"] = tiny_source_archive()
        kwargs["headers"]["Content-Type"] = "application/gzip"
    elif (method, path) == ("POST", "/v1/jobs"):
        kwargs["json"] = {"source": ids["source_id"], "targets": ["gguf:Q8_0"]}
    elif endpoint.body is not None:
        kwargs["json"] = endpoint.body
    return world.client.request(method, url, **kwargs)


def expected(endpoint: Endpoint, caller: str, tenant: str) -> int:
    if caller in BAD_CALLERS:
        return 401
    other = tenant == "other"
    if other and endpoint.tenant == "path":
        return 404  # never 403: that would say the resource exists
    if endpoint.operator or not (ROLES.index(caller) >= ROLES.index(endpoint.role)):
        return 403
    if other and endpoint.tenant == "body":  # another tenant's source: as good as missing
        return 404
    return endpoint.ok


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("matrix") / "data")
    with build_client(settings, role=None) as client:
        yield World(client, settings)


def _cases():
    for (method, path) in ENDPOINTS:
        for caller in BAD_CALLERS + ROLES:
            for tenant in ("own", "other"):
                if tenant == "other" and caller in BAD_CALLERS and (method, path) != ("GET", "/v1/jobs/{job_id}"):
                    continue  # 401 comes before any lookup: one endpoint shows it for the other tenant
                yield pytest.param(method, path, caller, tenant, id=f"{method} {path} {caller} {tenant}")


@pytest.mark.parametrize(("method", "path", "caller", "tenant"), list(_cases()))
def test_status(world, method, path, caller, tenant):
    endpoint = ENDPOINTS[(method, path)]
    r = call(world, method, path, endpoint, caller, tenant)
    want = expected(endpoint, caller, tenant)
    assert r.status_code == want, (method, path, caller, tenant, r.text[:500])
    if want == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "unauthorized"
    if want == 403:
        assert r.json()["error"]["code"] == "forbidden"


def served_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, in the schema or not. FastAPI >= 0.16x keeps
    an included router as one entry whose effective routes carry the prefixed paths."""
    out = set()
    for route in app.routes:
        if hasattr(route, "effective_route_contexts"):
            pairs = [(c.path, c.original_route) for c in route.effective_route_contexts()]
        else:
            pairs = [(route.path, route)]
        out |= {(m, path) for path, r in pairs for m in getattr(r, "methods", None) or ()}
    return out


def test_every_route_is_in_the_matrix(world):
    routes = served_routes(world.app)
    assert routes - PUBLIC == set(ENDPOINTS), "add the new route to ENDPOINTS (and give it a role)"
    assert PUBLIC <= routes
    schema = world.app.openapi()
    in_schema = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    assert in_schema <= routes
    # The schema says which operations need the bearer key: all but the health probes.
    assert schema["security"] == [{"bearer": []}]
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["bearer"][
            "description"]}
    opened = {(m.upper(), p) for p, ops in schema["paths"].items() for m, op in ops.items() if op.get("security") == []}
    assert opened == {("GET", "/healthz"), ("GET", "/readyz")}


def test_public_endpoints_need_no_key(world):
    for method, path in sorted(PUBLIC):
        r = world.client.request(method, path)
        assert r.status_code in (200, 503), (path, r.status_code)  # readyz: the broker may be absent
    # The pages are shells: nothing of the catalog in them.
    for path in ("/", "/docs"):
        page = world.client.get(path).text
        assert world.shared["acme"]["artifact_id"] not in page and "acme" not in page


def test_metrics_for_the_operator_and_the_scrape_token(tmp_path):
    token = "scrape-" + "s" * 30
    settings = make_settings(tmp_path / "d", metrics_token=token)
    with build_client(settings, role=None) as client:
        viewer = make_key(settings, role="viewer", org="default", name="ops-viewer")[1]
        tenant_admin = make_key(settings, role="admin", org="acme", name="acme-admin")[1]
        for secret, status in ((token, 200), (viewer, 200), (tenant_admin, 403), (token + "x", 401), (None, 401)):
            headers = {"Authorization": f"Bearer {secret}"} if secret else {}
            r = client.get("/metrics", headers=headers)
            assert r.status_code == status, (secret, r.text[:200])
            if status == 200:
                assert "quantyard_jobs_submitted_total" in r.text
        refused = client.get("/metrics", headers={"Authorization": f"Bearer {tenant_admin}"}).json()
        assert "QUANTYARD_METRICS_TOKEN" in refused["error"]["message"]


def test_a_short_metrics_token_is_refused():
    from pydantic import ValidationError

    from quantyard.settings import Settings

    with pytest.raises(ValidationError, match="metrics_token"):
        Settings(metrics_token="short")


def test_listings_show_only_the_callers_organisation(world):
    acme, globex = world.shared["acme"], world.shared["globex"]
    h = world.headers("viewer")
    jobs = world.client.get("/v1/jobs", headers=h, params={"limit": 500}).json()["items"]
    arts = world.client.get("/v1/artifacts", headers=h, params={"limit": 500}).json()["items"]
    assert acme["job_id"] in {j["id"] for j in jobs} and acme["artifact_id"] in {a["id"] for a in arts}
    assert {j["organization_id"] for j in jobs} == {world.orgs["acme"]}
    assert {a["organization_id"] for a in arts} == {world.orgs["acme"]}
    assert globex["job_id"] not in {j["id"] for j in jobs}
    # Filters cannot reach across either.
    r = world.client.get("/v1/artifacts", headers=h, params={"source": globex["source_id"]})
    assert r.status_code == 200 and r.json()["items"] == []
    r = world.client.get("/v1/artifacts", headers=h, params={"q": "globex"})
    assert r.status_code == 200 and r.json()["items"] == []
    keys = world.client.get("/v1/keys", headers=world.headers("admin")).json()["items"]
    assert keys and {k["organization"] for k in keys} == {"acme"} and all("secret" not in k for k in keys)
    assert all("key_hash" not in k for k in keys)


def test_another_tenants_source_uri_is_no_object(world):
    globex = world.shared["globex"]
    with world.app.state.session_factory() as s:
        uri = catalog.get_source(s, source_id=globex["source_id"]).uri
    r = world.client.post("/v1/jobs", headers=world.headers("submitter"),
                          json={"source": uri, "targets": ["gguf:Q8_0"]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "source_not_found"


def test_submitter_cancels_only_its_own_jobs(world):
    ids = world.resources("acme")  # submitted by acme-submitter
    with world.app.state.session_factory.begin() as s:
        src = catalog.get_source(s, source_id=ids["source_id"])
        other = catalog.create_job(s, source_id=src.id, targets=["gguf:Q8_0"], actor="acme-maintainer",
                                   request=catalog.RequestInfo(organization_id=world.orgs["acme"]))
        other_id = other.id
    r = world.client.post(f"/v1/jobs/{other_id}/cancel", headers=world.headers("submitter"))
    assert r.status_code == 403 and "own jobs" in r.json()["error"]["message"]
    assert world.client.post(f"/v1/jobs/{other_id}/cancel", headers=world.headers("maintainer")).status_code == 200


def test_audit_records_actor_and_organisation_and_export_is_scoped(world):
    ids = world.resources("acme")
    r = world.client.post(f"/v1/jobs/{ids['job_id']}/cancel", headers=world.headers("submitter"))
    assert r.status_code == 202
    denied = world.client.post(f"/v1/artifacts/{ids['artifact_id']}/withdraw", headers=world.headers("viewer"),
                               json={"reason": "x"})
    assert denied.status_code == 403
    export = world.client.get("/v1/audit", headers=world.headers("admin"))
    assert export.status_code == 200 and export.headers["x-audit-scope"] == "organization"
    events = [json.loads(line) for line in export.text.splitlines()]
    assert events and {e["organization_id"] for e in events} == {world.orgs["acme"]}
    cancel = [e for e in events if e["action"] == "job.cancel" and e["resource_id"] == ids["job_id"]]
    assert cancel and cancel[-1]["actor"] == "acme-submitter"
    refused = [e for e in events if e["action"] == "access.denied" and e["resource_id"] == ids["artifact_id"]]
    assert refused and refused[-1]["actor"] == "acme-viewer" and refused[-1]["outcome"] == "failure"
    # The operator (an admin of the default organisation) exports the whole chain, which verifies.
    operator = make_key(world.settings, role="admin", org="default", name="operator")[1]
    full = world.client.get("/v1/audit", headers={"Authorization": f"Bearer {operator}"})
    assert full.headers["x-audit-scope"] == "chain"
    from quantyard.catalog.audit import verify_export

    assert verify_export(full.text.splitlines(keepends=True)).ok
    orgs = {json.loads(line).get("organization_id") for line in full.text.splitlines()}
    assert {world.orgs["acme"], world.orgs["globex"]} <= orgs
