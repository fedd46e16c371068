"""`quantyard artifacts` (catalog search) and `quantyard delete | restore | hold | release` through
QuantyardClient, talking to a real app (the TestClient is an httpx.Client bound to it): filters
against a Python filter over the seeded rows, cursor paging across pages, retention round trips,
and server refusals printed with their message and a non-zero exit status."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from quantyard import catalog, cli
from quantyard.client import QuantyardClient
from tests.api.conftest import make_key

T0 = datetime(2026, 5, 1, tzinfo=UTC)

# name, format, quantization, size, metrics, labelled (made by the job labelled team=edge, env=prod)
ROWS = [
    ("q8", "gguf", "Q8_0", 1_600, {"mean_kl": 0.002, "top1_agreement": 0.99}, True),
    ("q4", "gguf", "Q4_K_M", 900, {"mean_kl": 0.03, "top1_agreement": 0.93}, True),
    ("q2", "gguf", "Q2_K", 600, {"mean_kl": 0.4, "top1_agreement": 0.7}, True),
    ("i8", "onnx", "int8-dynamic", 1_500, {"cosine_min": 0.996}, True),
    ("i4", "onnx", "int4", 800, {"cosine_min": 0.88}, True),
    ("f16", "gguf", "F16", 3_000, {"mean_kl": 0.0001, "top1_agreement": 1.0}, False),
    ("q5", "gguf", "Q5_K_M", 1_100, {"mean_kl": 0.01, "top1_agreement": 0.96, "bits_per_weight": 5.7}, False),
]


@pytest.fixture
def seeded(client, source, tmp_path):
    """The ROWS as real artifacts (bytes in the app's store) of the uploaded source; the n-th made
    n hours after T0. Returns {name: artifact id}."""
    app, ids = client.app, {}
    with app.state.session_factory.begin() as s:
        job = catalog.create_job(s, source_id=source["id"], targets=["gguf:Q8_0"],
                                 labels={"team": "edge", "env": "prod"}, actor="test")
        for n, (name, fmt, quant, size, metrics, labelled) in enumerate(ROWS):
            path = tmp_path / f"{name}.bin"
            path.write_bytes(name.encode() * (size // len(name)) + b"x" * (size % len(name)))
            stored = app.state.store.put_file(f"artifacts/{name}/{path.name}", path)
            art = catalog.record_artifact(
                s, job_id=job.id if labelled else None, target_id=None, source_id=source["id"], format=fmt,
                quantization=quant, sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri,
                storage_key=stored.key, filename=f"tiny-{quant}.{fmt}", metrics=metrics, metadata={},
                engine_version="test", recipe={}, recipe_hash=hashlib.sha256(name.encode()).hexdigest(),
                actor="test")
            art.created_at = T0 + timedelta(hours=n)
            ids[name] = art.id
    return ids


def _api(test_client: TestClient) -> QuantyardClient:
    api = QuantyardClient("http://testserver")
    api._http = test_client
    return api


@pytest.fixture
def run(client, monkeypatch):
    """run(*args, as_role=None) -> click Result of `quantyard ARGS` against the app (admin key, or a
    fresh key of ``as_role``); search pages of 2 so that paging is exercised with a few rows."""
    def invoke(*args: str, as_role: str | None = None):
        test_client = client
        if as_role is not None:
            secret = make_key(client.app.state.settings, role=as_role)[1]
            test_client = TestClient(client.app, raise_server_exceptions=False,
                                     headers={"Authorization": f"Bearer {secret}"})
        api = _api(test_client)
        pages = api.artifact_pages
        monkeypatch.setattr(api, "artifact_pages", lambda **kw: pages(page_size=2, **kw))
        monkeypatch.setattr(cli, "_client", lambda server: api)
        return CliRunner().invoke(cli.main, list(args))
    return invoke


def _listed(run, *args) -> list[str]:
    result = run("artifacts", "--json", *args)
    assert result.exit_code == 0, result.output
    return [a["id"] for a in json.loads(result.stdout)["items"]]


def _oracle(ids, keep, *, sort="created") -> list[str]:
    """Independent of the server: the ROWS filtered in Python, sorted as the API documents."""
    rows = [(n, r) for n, r in enumerate(ROWS) if keep(*r)]
    if sort == "created":
        rows.sort(key=lambda nr: -nr[0])  # newest first
    elif sort == "size":
        rows.sort(key=lambda nr: nr[1][3])
    return [ids[r[0]] for _, r in rows]


def test_filters_match_a_python_filter(run, seeded):
    ids = seeded
    assert _listed(run) == _oracle(ids, lambda *r: True)
    assert _listed(run, "--format", "GGUF", "--max-mean-kl", "0.05") == _oracle(
        ids, lambda n, f, q, size, m, lab: f == "gguf" and m.get("mean_kl", 9) <= 0.05)
    assert _listed(run, "--label", "team=edge", "--label", "env=prod", "--max-size", "1K") == _oracle(
        ids, lambda n, f, q, size, m, lab: lab and size <= 1024)
    assert _listed(run, "--min-size", "900", "--max-size", "1600", "--min-top1", "0.9") == _oracle(
        ids, lambda n, f, q, size, m, lab: 900 <= size <= 1600 and m.get("top1_agreement", 0) >= 0.9)
    assert _listed(run, "--architecture", "LlamaForCausalLM", "--min-cosine", "0.99") == [ids["i8"]]
    assert _listed(run, "--max-bits-per-weight", "6", "--quantization", "q5_k_m") == [ids["q5"]]
    assert _listed(run, "--created-after", "2026-05-01T02:00:00Z", "--created-before", "2026-05-01T04:00:00Z") == [
        ids["i8"], ids["q2"]]
    assert _listed(run, "--q", "TINY-Q", "--format", "onnx") == []  # filenames are tiny-<quant>.<fmt>
    assert _listed(run, "--q", "tiny-int", "--format", "onnx") == [ids["i4"], ids["i8"]]
    assert _listed(run, "--sort", "mean_kl") == [ids[n] for n in ("f16", "q8", "q5", "q4", "q2")]
    assert _listed(run, "--sort", "size", "--all") == _oracle(ids, lambda *r: True, sort="size")


def test_limit_cursor_and_all_follow_the_pages(run, seeded):
    every = _oracle(seeded, lambda *r: True, sort="size")
    result = run("artifacts", "--sort", "size", "--limit", "5", "--json")  # pages of 2: 2 + 2 + 1
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)
    assert [a["id"] for a in first["items"]] == every[:5] and first["next_cursor"]
    rest = _listed(run, "--sort", "size", "--cursor", first["next_cursor"])
    assert rest == every[5:]  # the cursor points just past the 5th: no gap, no repeat
    result = run("artifacts", "--sort", "size", "--all", "--json")
    assert json.loads(result.stdout) == {"items": json.loads(result.stdout)["items"], "next_cursor": None}
    assert [a["id"] for a in json.loads(result.stdout)["items"]] == every
    text = run("artifacts", "--sort", "size", "--limit", "3")
    lines = text.stdout.splitlines()
    assert [line.split()[0] for line in lines] == every[:3], text.output
    assert "3 shown; more with --cursor" in text.stderr


def test_bad_search_values_exit_non_zero_with_the_message(run, seeded):
    result = run("artifacts", "--min-top1", "2")
    assert result.exit_code == 1 and "422" in result.output and "min_top1" in result.output
    result = run("artifacts", "--created-after", "yesterday")
    assert result.exit_code == 1 and "created_after" in result.output
    result = run("artifacts", "--label", "team")
    assert result.exit_code == 2 and "key=value" in result.output
    result = run("artifacts", "--max-size", "lots")
    assert result.exit_code == 2 and "--max-size" in result.output
    result = run("artifacts", "--all", "--limit", "3")
    assert result.exit_code == 2 and "--all and --limit" in result.output


def _events(client, artifact_id) -> list[tuple[str, str, str]]:
    with client.app.state.session_factory() as s:
        return [(e.action, e.outcome, e.actor) for e in reversed(
            catalog.audit_events(s, resource_type="artifact", resource_id=artifact_id))][1:]


def test_delete_restore_hold_release(run, seeded, client):
    aid = seeded["q4"]
    result = run("delete", aid, "--reason", "superseded by v2")
    assert result.exit_code == 0, result.output
    assert f"artifact {aid} deleted; restorable until" in result.output
    assert aid not in _listed(run)
    listed = run("artifacts", "--include-deleted", "--quantization", "Q4_K_M")
    assert listed.stdout.split()[0] == aid and "[deleted]" in listed.stdout
    assert client.get(f"/v1/artifacts/{aid}/download").status_code == 410

    result = run("restore", aid, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["deleted"] is False
    result = run("restore", aid)
    assert result.exit_code == 1 and "409 not_deleted" in result.output

    result = run("hold", aid, "--reason", "case 42", as_role="maintainer")
    assert result.exit_code == 0 and "on legal hold" in result.output and "case 42" in result.output
    result = run("delete", aid, as_role="maintainer")
    assert result.exit_code == 1 and "409 legal_hold" in result.output
    result = run("release", aid, as_role="maintainer")  # lifting a hold is the admin's
    assert result.exit_code == 1 and "403" in result.output
    result = run("release", aid, "--reason", "settled", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["legal_hold"] is None
    result = run("delete", aid, "--json", as_role="maintainer")
    body = json.loads(result.stdout)
    assert result.exit_code == 0 and body["deleted"] is True and body["derived_artifacts"] == []
    result = run("hold", "art_nope", "--reason", "x")
    assert result.exit_code == 1 and "404" in result.output

    events = _events(client, aid)
    assert [a for a, o, _ in events if o == "success" and a != "artifact.download"] == [
        "artifact.delete", "artifact.restore", "artifact.legal_hold", "artifact.legal_hold_release",
        "artifact.delete"]
    assert [a for a, o, _ in events if o == "failure" and a.startswith("artifact.")] == [
        "artifact.restore", "artifact.delete"]  # the maintainer's release is refused before the route
    # (audited by the auth layer as a denial), so the hold stayed until the admin lifted it
    (release,) = [actor for a, o, actor in events if a == "artifact.legal_hold_release" and o == "success"]
    assert release == "test-admin"


def test_viewer_cannot_delete(run, seeded):
    result = run("delete", seeded["q8"], as_role="viewer")
    assert result.exit_code == 1 and "403" in result.output
    assert seeded["q8"] in _listed(run)


def test_withdraw_then_reinstate_from_the_cli(run, client, seeded, source):
    """source withdrawn (every artifact flagged), the q8 artifact withdrawn on its own too:
    reinstating the source leaves q8 withdrawn by its own withdrawal."""
    r = run("withdraw", "artifact", seeded["q8"], "--reason", "bad quant")
    assert r.exit_code == 0, r.output
    r = run("withdraw", "source", source["id"], "--reason", "licence unclear")
    assert r.exit_code == 0, r.output
    refused = run("reinstate", "source", source["id"], "--reason", "ok", as_role="maintainer")
    assert refused.exit_code == 1 and "admin" in refused.output
    r = run("reinstate", "artifact", seeded["q4"], "--reason", "ok")  # flagged via the source
    assert r.exit_code == 1 and f"reinstate source {source['id']}" in r.output
    r = run("reinstate", "source", source["id"], "--reason", "licence confirmed", "--json")
    assert r.exit_code == 0, r.output
    body = json.loads(r.output)
    assert {n["id"] for n in body["reinstated"]} == {source["id"]} | set(seeded.values()) - {seeded["q8"]}
    assert body["still_withdrawn"] == []
    listed = {a["id"] for a in client.get("/v1/artifacts", params={"limit": 100}).json()["items"]}
    assert listed == set(seeded.values()) - {seeded["q8"]}
    r = run("reinstate", "artifact", seeded["q8"], "--reason", "quant was fine")
    assert r.exit_code == 0 and "withdrawal undone" in r.output
    assert client.get(f"/v1/artifacts/{seeded['q8']}").json()["withdrawn"] is False
    r = run("lineage", "source", source["id"], "--direction", "downstream", "--depth", "1")
    assert r.exit_code == 0, r.output
    assert {n["id"] for n in json.loads(r.output)["downstream"]} == set(seeded.values())
    r = run("lineage", "source", "src_missing")
    assert r.exit_code == 1 and "src_missing" in r.output
