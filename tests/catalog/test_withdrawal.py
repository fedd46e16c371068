"""Withdrawal across three generations made by the real worker pipeline, on SQLite and Postgres.

A tiny Llama stored in float16 is converted in-process (no Celery) to Q4_K_M and Q8_0: the
pipeline first makes the lossless F16 intermediate, then quantizes it, so the catalog holds
source -> F16 -> {Q4_K_M, Q8_0} with the recipe on every edge. The chain is built once per
backend; each test works on a copy of that catalog (a file copy / a Postgres template).
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from dataclasses import dataclass

import pytest

from quantyard import catalog
from quantyard.catalog.models import DEFAULT_ORGANIZATION_ID
from quantyard.settings import Settings
from tests.api.conftest import build_client, make_settings
from tests.fixtures.models import cached_model, make_tiny_llama
from tests.fixtures.services import (
    _pg_url_for,
    _require_postgres,
    create_pg_database,
    drop_pg_database,
)


@dataclass
class Chain:
    url: str
    storage_url: str
    source: str
    f16: str
    q4: str
    q8: str

    @property
    def artifacts(self) -> set[str]:
        return {self.f16, self.q4, self.q8}


def _build_chain(settings: Settings) -> dict[str, str]:
    from worker.pipeline import run_job
    from worker.runtime import build_runtime
    from worker.target_pipeline import run_target

    model_dir = cached_model("tiny-llama-f16", make_tiny_llama, dtype="float16")
    rt = build_runtime(settings, worker_id="test-worker:cpu")
    archive = settings.data_dir / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(model_dir, arcname="tiny-llama-f16")
    stored = rt.store.put_file("sources/test/source.tar.gz", archive)
    with rt.session() as s:
        source = catalog.create_source(s, name="tiny-llama-f16", sha256=stored.sha256, size_bytes=stored.size_bytes,
                                       uri=stored.uri, storage_key=stored.key, architecture="LlamaForCausalLM",
                                       metadata={}, actor="key:test", organization_id=DEFAULT_ORGANIZATION_ID)
        job = catalog.create_job(s, source_id=source.id, targets=["gguf:Q4_K_M", "gguf:Q8_0"], actor="key:test")
        s.commit()
        source_id, job_id = source.id, job.id
    dispatched: list[tuple] = []
    assert run_job(rt, job_id, lambda *args: dispatched.append(args)) == "dispatched"
    assert [run_target(rt, *args) for args in dispatched] == ["succeeded", "succeeded"]
    with rt.session() as s:
        job = catalog.get_job(s, job_id=job_id).to_dict()
    rt.sessions.kw["bind"].dispose()  # the catalog is copied next: no connection may stay open
    (f16,) = job["intermediate_artifact_ids"]
    q4, q8 = job["artifact_ids"]
    return {"source": source_id, "f16": f16, "q4": q4, "q8": q8}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def built_chain(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"chain-{request.param}")
    pg_name = None
    if request.param == "sqlite":
        url = f"sqlite:///{root / 'catalog.db'}"
    else:
        _require_postgres()
        pg_name = create_pg_database("quantyard_wd")
        url = _pg_url_for(pg_name)
    try:
        catalog.upgrade_database(url)
        (root / "data").mkdir()
        settings = Settings(data_dir=root / "data", database_url=url, storage_url=f"file://{root / 'objects'}")
        ids = _build_chain(settings)
        yield request.param, pg_name or root / "catalog.db", settings.resolved_storage_url, ids
    finally:
        if pg_name:
            drop_pg_database(pg_name)


@pytest.fixture
def chain(built_chain, tmp_path):
    """A private copy of the built catalog (the objects are shared, read only)."""
    backend, template, storage_url, ids = built_chain
    if backend == "sqlite":
        shutil.copyfile(template, tmp_path / "catalog.db")
        yield Chain(url=f"sqlite:///{tmp_path / 'catalog.db'}", storage_url=storage_url, **ids)
        return
    name = create_pg_database("quantyard_wdc", template=template)
    try:
        yield Chain(url=_pg_url_for(name), storage_url=storage_url, **ids)
    finally:
        drop_pg_database(name)


@pytest.fixture
def factory(chain):
    engine = catalog.make_engine(chain.url)
    yield catalog.make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def client(chain, tmp_path):
    settings = make_settings(tmp_path / "api", database_url=chain.url, storage_url=chain.storage_url,
                             auth="disabled")
    with build_client(settings, migrate=False) as c:
        yield c


def _flags(factory, chain) -> dict[str, tuple]:
    with factory() as s:
        rows = [catalog.get_source(s, source_id=chain.source)] + [
            catalog.get_artifact(s, artifact_id=a) for a in sorted(chain.artifacts)]
        return {r.id: (r.withdrawn_reason, r.withdrawn_root_type, r.withdrawn_root_id) if r.withdrawn_at else None
                for r in rows}


def test_the_pipeline_made_three_generations_with_recipes(chain, factory):
    with factory() as s:
        assert catalog.get_artifact(s, artifact_id=chain.f16).quantization == "F16"  # the source's own dtype
        down = catalog.lineage(s, source_id=chain.source, direction="downstream")
    assert {(n["id"], n["depth"]) for n in down["downstream"]} == {(chain.f16, 1), (chain.q4, 2), (chain.q8, 2)}
    by_child = {e["child"]["id"]: e for e in down["edges"]}
    assert by_child[chain.f16]["made_by"]["quantization"] == "F16"
    for art, quant in ((chain.q4, "Q4_K_M"), (chain.q8, "Q8_0")):
        made_by = by_child[art]["made_by"]
        assert by_child[art]["parent"] == {"type": "artifact", "id": chain.f16}
        assert (made_by["converter"], made_by["quantization"]) == ("gguf", quant)
        assert made_by["engine_version"] and made_by["inputs"]["intermediate_sha256"]


def test_withdrawing_the_source_flags_hides_and_refuses_all_three(chain, factory, client):
    reason = "licence revoked upstream"
    r = client.post(f"/v1/sources/{chain.source}/withdraw", json={"reason": reason})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["already_withdrawn"] is False and body["node"]["withdrawal"]["reason"] == reason
    assert {f["id"] for f in body["flagged"]} == chain.artifacts
    assert {f["id"]: f["depth"] for f in body["flagged"]} == {chain.f16: 1, chain.q4: 2, chain.q8: 2}
    root = ("source", chain.source)
    assert _flags(factory, chain) == {i: (reason, *root) for i in chain.artifacts | {chain.source}}

    # Hidden from the default listing, shown on request with the withdrawal spelled out.
    assert client.get("/v1/artifacts").json()["items"] == []
    shown = client.get("/v1/artifacts", params={"include_withdrawn": "true"}).json()["items"]
    assert {a["id"] for a in shown} == chain.artifacts
    assert all(a["withdrawal"]["root"] == {"type": "source", "id": chain.source} for a in shown)

    # Refused for download, naming the ancestor and the reason; a maintainer may override.
    r = client.get(f"/v1/artifacts/{chain.q4}/download")
    assert r.status_code == 410
    err = r.json()["error"]
    assert err["code"] == "withdrawn" and chain.source in err["message"] and reason in err["message"]
    assert err["details"]["withdrawn_root"] == {"type": "source", "id": chain.source}
    r = client.get(f"/v1/artifacts/{chain.q4}/download", params={"allow_withdrawn": "true"})
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == r.headers["x-content-sha256"]

    # No new jobs on the source; a second withdrawal keeps the first reason.
    r = client.post("/v1/jobs", json={"source": chain.source, "targets": ["gguf:Q8_0"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "source_withdrawn"
    assert reason in r.json()["error"]["message"]
    again = client.post(f"/v1/sources/{chain.source}/withdraw", json={"reason": "something else"}).json()
    assert again["already_withdrawn"] is True and again["node"]["withdrawal"]["reason"] == reason
    assert again["flagged"] == [] and {f["id"] for f in again["already_flagged"]} == chain.artifacts

    # Audited: the withdrawal (listing what it flagged), one event per flagged node, the override.
    with factory() as s:
        events = [e.to_dict() for e in catalog.audit_events(s, limit=1000)]
        assert catalog.verify_audit_chain(s).ok
    first = next(e for e in events if e["action"] == "source.withdraw" and not e["details"]["already_withdrawn"])
    assert first["resource_id"] == chain.source and first["details"]["reason"] == reason
    assert {f["id"] for f in first["details"]["flagged"]} == chain.artifacts
    flagged = {e["resource_id"] for e in events if e["action"] == "artifact.withdrawn"}
    assert flagged == chain.artifacts
    downloads = [e for e in events if e["action"] == "artifact.download" and e["resource_id"] == chain.q4]
    assert len(downloads) == 1 and downloads[0]["details"]["withdrawal"]["reason"] == reason


def test_withdrawing_the_intermediate_leaves_the_source(chain, factory):
    with factory.begin() as s:
        result = catalog.withdraw_artifact(s, artifact_id=chain.f16, reason="bad conversion", actor="key:maint")
    assert {f["id"] for f in result["flagged"]} == {chain.q4, chain.q8}
    root = ("artifact", chain.f16)
    assert _flags(factory, chain) == {chain.source: None, chain.f16: ("bad conversion", *root),
                                      chain.q4: ("bad conversion", *root), chain.q8: ("bad conversion", *root)}
    with factory() as s:
        assert catalog.list_artifacts(s)[0] == []
        assert catalog.find_artifact_by_recipe(s, recipe_hash=catalog.get_artifact(
            s, artifact_id=chain.f16).recipe_hash) is None  # never reused by a later job
        catalog.check_not_withdrawn(s, source_id=chain.source)  # the source is still usable

    # Withdrawing the source later flags it; its descendants keep the first (intermediate's) flag.
    with factory.begin() as s:
        later = catalog.withdraw_source(s, source_id=chain.source, reason="licence", actor="key:maint")
    assert later["flagged"] == [] and {f["id"] for f in later["already_flagged"]} == chain.artifacts
    flags = _flags(factory, chain)
    assert flags[chain.source] == ("licence", "source", chain.source)
    assert flags[chain.q4] == ("bad conversion", *root)
    with factory() as s, pytest.raises(catalog.Withdrawn, match="licence"):
        catalog.check_not_withdrawn(s, source_id=chain.source)


def test_reinstating_the_source_clears_all_three(chain, factory, client):
    client.post(f"/v1/sources/{chain.source}/withdraw", json={"reason": "licence unclear"})
    # Only the withdrawn node itself can be reinstated: a flagged descendant names its cause.
    r = client.post(f"/v1/artifacts/{chain.q4}/reinstate", json={"reason": "mistake"})
    assert r.status_code == 409 and f"source {chain.source}" in r.json()["error"]["message"]
    with factory.begin() as s:
        result = catalog.reinstate(s, node_type="source", node_id=chain.source, reason="licence confirmed",
                                   actor="key:admin")
    assert result["still_withdrawn"] == []
    assert {(n["type"], n["id"]) for n in result["reinstated"]} == (
        {("source", chain.source)} | {("artifact", a) for a in chain.artifacts})
    assert _flags(factory, chain) == {i: None for i in chain.artifacts | {chain.source}}
    # Listed, downloadable and convertible again.
    assert {a["id"] for a in client.get("/v1/artifacts").json()["items"]} == chain.artifacts
    assert client.get(f"/v1/artifacts/{chain.q8}/download").status_code == 200
    with factory() as s:
        catalog.check_not_withdrawn(s, source_id=chain.source)
        events = [e.to_dict() for e in catalog.audit_events(s, limit=1000)]
        assert catalog.verify_audit_chain(s).ok
    undo = next(e for e in events if e["action"] == "source.reinstate")
    assert undo["details"]["reason"] == "licence confirmed"
    assert undo["details"]["undone"]["reason"] == "licence unclear"
    assert {e["resource_id"] for e in events if e["action"] == "artifact.reinstated"} == chain.artifacts
    # Nothing left to undo.
    with factory.begin() as s, pytest.raises(catalog.InvalidState, match="not withdrawn"):
        catalog.reinstate(s, node_type="source", node_id=chain.source, reason="again", actor="key:admin")


def test_reinstating_the_intermediate_under_a_withdrawn_source(chain, factory):
    """F16 withdrawn first (its children carry its flag), then the source: undoing F16's
    withdrawal must leave all three flagged by the source, since they still descend from it."""
    with factory.begin() as s:
        catalog.withdraw_artifact(s, artifact_id=chain.f16, reason="bad conversion", actor="key:maint")
        catalog.withdraw_source(s, source_id=chain.source, reason="licence", actor="key:maint")
    with factory.begin() as s:
        result = catalog.reinstate(s, node_type="artifact", node_id=chain.f16, reason="conversion was fine",
                                   actor="key:admin")
    assert result["reinstated"] == []
    assert {n["id"] for n in result["still_withdrawn"]} == chain.artifacts
    source_root = ("licence", "source", chain.source)
    assert _flags(factory, chain) == {i: source_root for i in chain.artifacts | {chain.source}}
    # Then undoing the source's clears everything.
    with factory.begin() as s:
        result = catalog.reinstate(s, node_type="source", node_id=chain.source, reason="licence ok",
                                   actor="key:admin")
    assert len(result["reinstated"]) == 4 and result["still_withdrawn"] == []
    assert set(_flags(factory, chain).values()) == {None}


def test_reinstating_needs_an_admin_and_a_reason(chain, factory, tmp_path):
    with factory.begin() as s:
        catalog.withdraw_artifact(s, artifact_id=chain.q8, reason="wrong quant", actor="key:maint")
    settings = make_settings(tmp_path / "auth", database_url=chain.url, storage_url=chain.storage_url)
    from tests.api.conftest import make_key

    with build_client(settings, migrate=False, role=None) as c:
        maint = {"Authorization": f"Bearer {make_key(settings, role='maintainer')[1]}"}
        admin = {"Authorization": f"Bearer {make_key(settings, role='admin', name='adm')[1]}"}
        r = c.post(f"/v1/artifacts/{chain.q8}/reinstate", json={"reason": "ok"}, headers=maint)
        assert r.status_code == 403
        r = c.post(f"/v1/artifacts/{chain.q8}/reinstate", json={"reason": " "}, headers=admin)
        assert r.status_code == 422 and "reason" in r.text
        r = c.post(f"/v1/artifacts/{chain.q8}/reinstate", json={"reason": "ok"}, headers=admin)
        assert r.status_code == 200, r.text
        assert [n["id"] for n in r.json()["reinstated"]] == [chain.q8]
    assert _flags(factory, chain)[chain.q8] is None
