"""GET /v1/artifacts search over HTTP (SQLite and Postgres): filters, repeated labels, sorts and
their cursors, and bad values answered 422 (naming the parameter) or 400 (cursor)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from quantyard import catalog
from quantyard.catalog.models import DEFAULT_ORGANIZATION_ID

T0 = datetime(2026, 5, 1, tzinfo=UTC)


@pytest.fixture
def seeded(any_db_client):
    """6 artifacts of the default organisation (the one an auth-disabled caller sees)."""
    factory = any_db_client.app.state.session_factory
    ids = {}
    with factory.begin() as s:
        src = catalog.create_source(s, name="Acme-Qwen-1.5B", sha256="c" * 64, size_bytes=1, uri="file:///q",
                                    storage_key="sources/q", architecture="Qwen2ForCausalLM", actor="key:test",
                                    organization_id=DEFAULT_ORGANIZATION_ID)
        job = catalog.create_job(s, source_id=src.id, targets=["gguf:Q8_0"], labels={"team": "edge", "env": "prod"},
                                 actor="key:test")
        rows = [("q8", "gguf", "Q8_0", 1_600, {"mean_kl": 0.002, "top1_agreement": 0.99}),
                ("q4", "gguf", "Q4_K_M", 900, {"mean_kl": 0.03, "top1_agreement": 0.93}),
                ("q2", "gguf", "Q2_K", 600, {"mean_kl": 0.4, "top1_agreement": 0.7}),
                ("i8", "onnx", "int8-dynamic", 1_500, {"cosine_min": 0.996}),
                ("i4", "onnx", "int4", 800, {"cosine_min": 0.88}),
                ("f16", "gguf", "F16", 3_000, {"mean_kl": 0.0001, "top1_agreement": 1.0})]
        for n, (name, fmt, quant, size, metrics) in enumerate(rows):
            art = catalog.record_artifact(
                s, job_id=job.id if name != "f16" else None, target_id=None, source_id=src.id, format=fmt,
                quantization=quant, sha256=hashlib.sha256(name.encode()).hexdigest(), size_bytes=size,
                uri=f"file:///{name}", storage_key=f"artifacts/{name}", filename=f"acme-qwen-{quant}.{fmt}",
                metrics=metrics, metadata={}, engine_version="test", recipe={}, recipe_hash=f"{n:064d}")
            art.created_at = T0 + timedelta(hours=n)
            ids[name] = art.id
    return any_db_client, ids


def _get(client, **params):
    r = client.get("/v1/artifacts", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def _names(ids, body):
    back = {v: k for k, v in ids.items()}
    return [back[i["id"]] for i in body["items"]]


def test_filters_over_http(seeded):
    client, ids = seeded
    assert _names(ids, _get(client)) == ["f16", "i4", "i8", "q2", "q4", "q8"]
    assert _names(ids, _get(client, format="GGUF", max_mean_kl=0.05)) == ["f16", "q4", "q8"]
    assert _names(ids, _get(client, quantization="q4_k_m")) == ["q4"]
    assert _names(ids, _get(client, architecture="Qwen2ForCausalLM", min_cosine=0.99)) == ["i8"]
    assert _names(ids, _get(client, label=["team=edge", "env=prod"], max_size=1000)) == ["i4", "q2", "q4"]
    assert _names(ids, _get(client, label="team=other")) == []
    assert _names(ids, _get(client, min_size=900, max_size=1600, min_top1=0.9)) == ["q4", "q8"]
    assert _names(ids, _get(client, created_after="2026-05-01T02:00:00Z", created_before="2026-05-01T04:00:00Z")) == [
        "i8", "q2"]
    assert _names(ids, _get(client, q="ACME-QWEN", format="onnx")) == ["i4", "i8"]
    assert _names(ids, _get(client, q=hashlib.sha256(b"q2").hexdigest()[:12])) == ["q2"]
    assert _names(ids, _get(client, max_bits_per_weight=5)) == []  # no bpw recorded here


@pytest.mark.parametrize(("sort", "expected"), [
    ("created", ["f16", "i4", "i8", "q2", "q4", "q8"]),
    ("size", ["q2", "i4", "q4", "i8", "q8", "f16"]),
    ("mean_kl", ["f16", "q8", "q4", "q2"]),
])
def test_sorts_and_cursors(seeded, sort, expected):
    client, ids = seeded
    seen, cursor = [], None
    while True:
        body = _get(client, sort=sort, limit=2, **({"cursor": cursor} if cursor else {}))
        seen += _names(ids, body)
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == expected


@pytest.mark.parametrize(("params", "name"), [
    ({"min_size": "-5"}, "min_size"),
    ({"max_size": "big"}, "max_size"),
    ({"min_size": "10", "max_size": "5"}, "min_size"),
    ({"created_after": "last week"}, "created_after"),
    ({"created_before": "2026-02-30"}, "created_before"),
    ({"max_mean_kl": "abc"}, "max_mean_kl"),
    ({"max_mean_kl": "nan"}, "max_mean_kl"),
    ({"min_top1": "2"}, "min_top1"),
    ({"min_cosine": "-0.1"}, "min_cosine"),
    ({"label": "team"}, "label"),
    ({"sort": "name"}, "sort"),
    ({"limit": "0"}, "limit"),
])
def test_bad_values_are_422_naming_the_parameter(seeded, params, name):
    client, _ = seeded
    r = client.get("/v1/artifacts", params=params)
    assert r.status_code == 422, r.text
    assert name in r.json()["error"]["message"]


def test_bad_cursor_is_400(seeded):
    client, _ = seeded
    r = client.get("/v1/artifacts", params={"cursor": "garbage"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_cursor"
    created_cursor = _get(client, limit=1)["next_cursor"]
    r = client.get("/v1/artifacts", params={"cursor": created_cursor, "sort": "size"})
    assert r.status_code == 400 and "sort=size" in r.json()["error"]["message"]
