"""The API as a hostile caller sees it: body caps, small listings, JSON that always parses,
query parameters out of range, error bodies without library text or server paths, security
headers, no third-party script on the pages, and the error statuses documented on every route."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import socket

import pytest
from click.testing import CliRunner

from quantyard import catalog
from tests.api import archives
from tests.api.conftest import build_client, make_settings, upload

KiB, MiB = 1 << 10, 1 << 20


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (as browsers' JSON.parse does)."""
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def submit(client, source_id, **body):
    return client.post("/v1/jobs", json={"source": source_id, "targets": ["gguf:Q8_0"], **body})


# ---------------------------------------------------------------- body caps


@pytest.fixture
def small_cap_client(tmp_path):
    with build_client(make_settings(tmp_path / "data", max_json_body_bytes=64 * KiB)) as c:
        yield c


def test_declared_body_over_the_cap_is_413_before_it_is_read(small_cap_client):
    r = small_cap_client.post("/v1/jobs", content=b"{" + b" " * (64 * KiB) + b"}",
                              headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large" and str(64 * KiB) in r.json()["error"]["message"]
    assert r.headers["x-request-id"] and r.headers["x-content-type-options"] == "nosniff"


def test_chunked_body_over_the_cap_is_413(small_cap_client):
    def chunks():  # no Content-Length: counted while it is read
        yield b'{"source": "src_x", "targets": ["gguf:Q8_0"], "labels": {"a": "'
        for _ in range(100):
            yield b"x" * KiB
        yield b'"}}'

    r = small_cap_client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"


def test_the_source_upload_has_its_own_cap_not_the_json_one(small_cap_client):
    import os

    data = archives.model_tar_gz({**archives.model_files(), "pad.bin": os.urandom(96 * KiB)})  # incompressible
    assert len(data) > 64 * KiB
    r = upload(small_cap_client, data)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(("body", "field"), [
    ({"labels": {f"k{i}": "v" for i in range(65)}}, "labels"),
    ({"labels": {"k": "v" * 501}}, "labels.k"),
    ({"labels": {"k" * 101: "v"}}, "labels"),
    ({"labels": {"a=b": "v"}}, "labels"),
    ({"targets": ["gguf:Q8_0"] * 33}, "targets"),
    ({"targets": []}, "targets"),
    ({"hardware_class": "c" * 51}, "hardware_class"),
])
def test_model_caps_are_422_naming_the_field(client, source, body, field):
    r = submit(client, source["id"], **body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "validation_error"
    assert err["message"].startswith(field), err["message"]


@pytest.mark.parametrize(("params", "field"), [
    ({"calibration_text": "x" * (MiB + 1)}, "targets[0].params.calibration_text"),
    ({"calibration_text": "é" * (MiB // 2 + 1)}, "targets[0].params.calibration_text"),  # bytes, not chars
    ({"blob": "x" * (17 * KiB)}, "targets[0].params"),
    ({"deep": json.loads("[" * 12 + "]" * 12)}, "targets[0].params"),
])
def test_target_params_caps(client, source, params, field):
    r = client.post("/v1/jobs", json={"source": source["id"],
                                      "targets": [{"format": "gguf", "quantization": "Q4_K_M", "params": params}]})
    assert r.status_code == 422, r.text[:300]
    err = r.json()["error"]
    assert err["message"].startswith(field + ":") and err["details"]["field"] == field


def test_listings_stay_small_with_long_calibration_texts(client, source):
    text = "The quick brown fox jumps over the lazy dog. " * 23_000  # ~1 MB, under the cap
    assert len(text.encode()) <= MiB
    ids = []
    for i in range(3):
        r = client.post("/v1/jobs", json={
            "source": source["id"], "labels": {f"l{j}": "v" * 500 for j in range(64)},
            "targets": [{"format": "gguf", "quantization": "Q4_K_M", "params": {"calibration_text": text + str(i)}}]})
        assert r.status_code == 202, r.text[:300]
        ids.append(r.json()["id"])
    listing = client.get("/v1/jobs", params={"limit": 50})
    assert listing.status_code == 200
    assert len(listing.content) < 200 * KiB, len(listing.content)  # 3 x 1 MB of text are not echoed
    by_id = {j["id"]: j for j in listing.json()["items"]}
    brief = by_id[ids[2]]["targets"][0]["params"]["calibration_text"]
    whole = (text + "2").encode()
    assert brief == {"sha256": hashlib.sha256(whole).hexdigest(), "bytes": len(whole), "omitted": True}
    # The job itself still shows what was asked for.
    one = client.get(f"/v1/jobs/{ids[2]}").json()
    assert one["targets"][0]["params"]["calibration_text"] == text + "2"


# ---------------------------------------------------------------- JSON safety


def _nan_artifact(app, source_id: str) -> str:
    """An artifact whose metrics hold NaN and Infinity, recorded through the catalog (as a worker
    of an older version, or a bug, might have left it)."""
    metrics = {"mean_kl": math.nan, "top1_agreement": math.inf, "ppl": {"source": -math.inf, "artifact": 1.5},
               "per_layer": [1.0, math.nan]}
    with app.state.session_factory.begin() as s:
        job = catalog.create_job(s, source_id=source_id, targets=["gguf:Q8_0"], actor="test")
        digest = hashlib.sha256(b"nan-artifact").hexdigest()
        art = catalog.record_artifact(
            s, job_id=job.id, target_id=job.targets[0].id, source_id=source_id, format="gguf", quantization="Q8_0",
            sha256=digest, size_bytes=12, uri="file:///nowhere", storage_key=f"artifacts/{digest}/m.gguf",
            filename="m.gguf", metrics=metrics, metadata={"bits_per_weight": math.nan}, engine_version="t",
            recipe={}, recipe_hash=digest)
        return art.id


def test_nan_metrics_never_break_a_listing(client, app, source):
    art_id = _nan_artifact(app, source["id"])
    for path, params in (("/v1/artifacts", {}), ("/v1/artifacts", {"sort": "mean_kl"}),
                         ("/v1/artifacts", {"sort": "size"}), (f"/v1/artifacts/{art_id}", {}),
                         (f"/v1/artifacts/{art_id}/lineage", {}), (f"/v1/sources/{source['id']}/lineage", {}),
                         (f"/v1/artifacts/{art_id}/bom", {})):
        r = client.get(path, params=params)
        assert r.status_code == 200, (path, r.text[:300])
        strict_json(r.text)  # parses as JSON, no NaN token
    items = client.get("/v1/artifacts").json()["items"]
    metrics = next(a for a in items if a["id"] == art_id)["metrics"]
    assert metrics["mean_kl"] is None and metrics["top1_agreement"] is None
    assert metrics["ppl"] == {"source": None, "artifact": 1.5} and metrics["per_layer"] == [1.0, None]


def test_json_response_writes_non_finite_as_null():
    from api.responses import JSONResponse, dumps

    assert JSONResponse({"a": [math.nan, 1.0, {"b": math.inf}]}).body == b'{"a":[null,1.0,{"b":null}]}'
    assert dumps({"x": 1}) == '{"x": 1}'


# ---------------------------------------------------------------- query parameters


@pytest.mark.parametrize(("path", "params", "parameter"), [
    ("/v1/artifacts", {"max_size": 2**64}, "max_size"),
    ("/v1/artifacts", {"min_size": 2**63}, "min_size"),
    ("/v1/artifacts", {"min_size": -1}, "min_size"),
    ("/v1/artifacts", {"created_after": "0001-01-01T00:00:00+14:00"}, "created_after"),
    ("/v1/artifacts", {"created_before": "9999-12-31T23:59:59-14:00"}, "created_before"),
    ("/v1/artifacts", {"max_mean_kl": "nan"}, "max_mean_kl"),
    ("/v1/artifacts", {"max_bits_per_weight": "inf"}, "max_bits_per_weight"),
    ("/v1/artifacts", {"limit": 0}, "limit"),
    ("/v1/artifacts", {"limit": 2**64}, "limit"),
    ("/v1/jobs", {"limit": 501}, "limit"),
    ("/v1/audit", {"since": "0001-01-01T00:00:00+14:00"}, "since"),
    ("/v1/audit", {"until": "9999-12-31T23:59:59-14:00"}, "until"),
    ("/v1/artifacts/x/lineage", {"depth": 2**64}, "depth"),
])
def test_out_of_range_parameters_are_422_naming_them(client, path, params, parameter):
    r = client.get(path, params=params)
    assert r.status_code == 422, (params, r.status_code, r.text[:300])
    assert parameter in r.json()["error"]["message"], r.text


def _cursor(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


@pytest.mark.parametrize(("path", "params"), [
    ("/v1/artifacts", {"cursor": "%%%"}),
    ("/v1/artifacts", {"cursor": _cursor({"s": "size", "k": 2**70, "id": "art_x"}), "sort": "size"}),
    ("/v1/artifacts", {"cursor": _cursor({"s": "created", "k": "0001-01-01T00:00:00+14:00", "id": "a"})}),
    ("/v1/jobs", {"cursor": "not-a-cursor"}),
    ("/v1/jobs", {"cursor": _cursor({"t": "0001-01-01T00:00:00+14:00", "id": "job_x"})}),
    ("/v1/jobs", {"cursor": _cursor({"t": "9999-12-31T23:59:59-14:00", "id": "job_x"})}),
])
def test_forged_cursors_are_400(client, source, path, params):
    submit(client, source["id"])
    r = client.get(path, params=params)
    assert r.status_code == 400, (params, r.text[:300])
    assert r.json()["error"]["code"] == "invalid_cursor"


# ---------------------------------------------------------------- errors and exposure


def _gguf_source(client, tmp_path) -> dict:
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_file_type(1)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    r = upload(client, path.read_bytes(), content_type="application/octet-stream")
    assert r.status_code == 201, r.text
    return r.json()


def test_gguf_source_with_an_onnx_target_is_422_at_submission(client, tmp_path):
    src = _gguf_source(client, tmp_path)
    r = client.post("/v1/jobs", json={"source": src["id"], "targets": ["gguf:Q4_K_M", "onnx:fp32"]})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_target" and err["message"].startswith("targets[1]: onnx:fp32")
    assert err["details"]["field"] == "targets[1]"
    assert client.post("/v1/jobs", json={"source": src["id"], "targets": ["gguf:Q4_K_M"]}).status_code == 202


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_server_paths_or_store_urls_in_errors(tmp_path):
    port = _closed_port()
    settings = make_settings(tmp_path / "d", broker_url=f"redis://127.0.0.1:{port}/0")
    with build_client(settings) as client:
        src = upload(client, archives.model_tar_gz()).json()
        texts = []
        r = client.post("/v1/jobs", json={"source": "ftp://elsewhere/x.tar", "targets": ["gguf:Q8_0"]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_source"
        texts.append(r.text)
        r = submit(client, src["id"])
        assert r.status_code == 503 and r.headers["retry-after"]
        texts.append(r.text)
        texts.append(client.get(f"/v1/jobs/{r.json()['error']['details']['job_id']}").text)
        for text in texts:
            assert str(settings.data_dir) not in text and "file://" not in text, text
            assert str(port) not in text and "redis://" not in text and "Error" not in text, text


def test_error_bodies_are_ours_for_framework_errors(client):
    cases = [client.get("/v1/nowhere"), client.put("/v1/jobs"),
             client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}),
             client.post("/v1/jobs", content=b"[" * 100_000, headers={"Content-Type": "application/json"}),
             client.get("/v1/jobs", headers={"Authorization": "Basic x"})]
    for r in cases:
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
        body = r.json()
        assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
        assert "Traceback" not in r.text and "/work" not in r.text and "site-packages" not in r.text


# ---------------------------------------------------------------- headers and pages


def test_security_headers_on_every_kind_of_answer(client):
    answers = {"json": client.get("/v1/jobs"), "404": client.get("/v1/jobs/job_nope"),
               "401": client.get("/v1/jobs", headers={"Authorization": ""}), "page": client.get("/"),
               "docs": client.get("/docs"), "static": client.get("/static/dashboard.js"),
               "health": client.get("/healthz")}
    for name, r in answers.items():
        h = r.headers
        assert h["x-content-type-options"] == "nosniff", name
        assert h["x-frame-options"] == "DENY" and h["referrer-policy"] == "no-referrer", name
        csp = h["content-security-policy"]
        assert "frame-ancestors 'none'" in csp, name
        script_src = re.search(r"script-src ([^;]+)", csp)
        assert "unsafe-inline" not in (script_src.group(1) if script_src else csp), name
        assert "unsafe-eval" not in csp, name
    for name in ("json", "404", "401"):
        assert answers[name].headers["cache-control"] == "no-store"
        assert answers[name].headers["content-security-policy"].startswith("default-src 'none'")


@pytest.mark.parametrize("page", ["/", "/docs"])
def test_pages_load_only_this_servers_scripts(client, page):
    html = client.get(page, headers={"Authorization": ""}).text
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
    assert " style=" not in html and "<style" not in html and "on" + "click=" not in html
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(ref.startswith("/static/") for ref in refs), refs
    for ref in refs:
        r = client.get(ref, headers={"Authorization": ""})
        assert r.status_code == 200 and len(r.content) > 100, ref
    if page == "/docs":
        assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in refs
        assert "validatorUrl: null" in client.get("/static/docs.js").text
    assert client.get("/static/../app.py").status_code == 404


def test_dashboard_script_sets_no_inline_styles(client):
    script = client.get("/static/dashboard.js").text
    assert "style=" not in script and "bar.style.width" in script


# ---------------------------------------------------------------- the OpenAPI schema


def test_every_operation_documents_the_error_statuses(client):
    schema = client.get("/openapi.json").json()
    ref = "#/components/schemas/ErrorBody"
    assert set(schema["components"]["schemas"]["ErrorBody"]["properties"]) == {"error"}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            for status in ("400", "401", "403", "404", "409", "413", "422", "503"):
                assert status in op["responses"], (method, path, status)
                content = op["responses"][status]["content"]["application/json"]["schema"]
                assert content == {"$ref": ref}, (method, path, status, content)


# ---------------------------------------------------------------- CLI


def test_keys_create_takes_data_dir_like_serve(tmp_path, monkeypatch):
    from quantyard.cli import main
    from quantyard.settings import get_settings

    monkeypatch.setenv("QUANTYARD_DATA_DIR", str(tmp_path / "not-this-one"))  # restored after the test
    data_dir = tmp_path / "elsewhere"
    try:
        out = CliRunner().invoke(main, ["keys", "create", "--data-dir", str(data_dir), "--role", "viewer",
                                        "--name", "ci", "--json"])
        assert out.exit_code == 0, out.output
        secret = json.loads(out.output)["secret"]
        assert (data_dir / "catalog.db").is_file() and not (tmp_path / "not-this-one").exists()
        with build_client(make_settings(data_dir), migrate=False, role=None) as client:
            r = client.get("/v1/jobs", headers={"Authorization": f"Bearer {secret}"})
            assert r.status_code == 200
    finally:
        get_settings.cache_clear()
