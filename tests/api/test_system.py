"""healthz, readyz, metrics, capabilities, dashboard, error shapes, import isolation."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from quantyard import catalog
from tests.api.conftest import build_client, make_settings
from tests.api.test_jobs import submit

REPO = Path(__file__).resolve().parents[2]


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_ok(client):
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"catalog": "ok", "broker": "ok", "storage": "ok"}


def test_readyz_broker_down(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(tmp_path / "d", broker_url=f"redis://127.0.0.1:{port}/0")
    with build_client(settings) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["error"]["code"] == "not_ready"
        assert "broker" in body["error"]["message"]
        assert body["checks"]["catalog"] == "ok" and body["checks"]["storage"] == "ok"
        assert body["checks"]["broker"] != "ok"


def test_metrics(client, app, source):
    text = client.get("/metrics").text
    for name in ("quantyard_jobs_submitted_total", "quantyard_jobs_finished_total",
                 "quantyard_job_duration_seconds_bucket", "quantyard_queue_depth"):
        assert name in text
    assert 'quantyard_jobs_submitted_total{hardware_class="cpu"} 0.0' in text
    job = submit(client, source["id"]).json()
    submit(client, source["id"], hardware_class="cuda")
    text = client.get("/metrics").text
    assert 'quantyard_jobs_submitted_total{hardware_class="cpu"} 1.0' in text
    assert 'quantyard_queue_depth{hardware_class="cuda"} 1.0' in text
    with app.state.session_factory() as s:
        catalog.claim_job(s, job_id=job["id"], worker_id="w", lease_s=60, max_attempts=3)
        s.commit()
        catalog.finish_job(s, job_id=job["id"], status="succeeded")
        s.commit()
    text = client.get("/metrics").text
    assert 'quantyard_jobs_finished_total{outcome="succeeded"} 1.0' in text
    assert 'quantyard_job_duration_seconds_count{outcome="succeeded"} 1.0' in text


def _sample(text: str, line_start: str) -> float:
    found = [ln for ln in text.splitlines() if ln.startswith(line_start)]
    assert len(found) == 1, (line_start, found)
    return float(found[0].rsplit(" ", 1)[1])


def test_http_request_metrics_by_route_template(client, source):
    """The board's API panels: requests by method, route template and status, and latency.
    Ids never become label values (the route's template does)."""
    job = submit(client, source["id"]).json()
    for _ in range(3):
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 200
    assert client.get("/v1/jobs/job_nope").status_code == 404
    assert client.get("/no/such/path").status_code == 404
    text = client.get("/metrics").text
    get_job = 'quantyard_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status='
    assert _sample(text, get_job + '"200"}') == 3.0
    assert _sample(text, get_job + '"404"}') == 1.0
    assert _sample(text, 'quantyard_http_requests_total{method="POST",route="/v1/jobs",status="202"}') == 1.0
    assert _sample(text, 'quantyard_http_requests_total{method="GET",route="unmatched",status="404"}') == 1.0
    count = 'quantyard_http_request_duration_seconds_count{method="GET",route="/v1/jobs/{job_id}"}'
    assert _sample(text, count) == 4.0
    assert job["id"] not in text


def test_http_request_metrics_sum_over_processes(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR (the images set it before start; uvicorn runs several
    processes) a scrape of one process reports every process's requests. Two processes here,
    each with the variable set before prometheus-client is imported, as in a container."""
    folder = tmp_path / "prom"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    other = textwrap.dedent("""
        from prometheus_client import CollectorRegistry
        from api.http_metrics import HttpMetrics
        HttpMetrics(CollectorRegistry()).observe("GET", "/v1/jobs", 200, 0.01)
    """)
    scrape = textwrap.dedent(f"""
        from pathlib import Path
        from tests.api.conftest import build_client, make_settings
        with build_client(make_settings(Path({str(tmp_path / "a")!r}))) as c:
            assert c.get("/v1/jobs").status_code == 200
            print(c.get("/metrics").text)
    """)
    for code in (other, scrape):
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env=env)
        assert done.returncode == 0, done.stderr
    text = done.stdout
    assert _sample(text, 'quantyard_http_requests_total{method="GET",route="/v1/jobs",status="200"}') == 2.0
    assert "quantyard_jobs_submitted_total" in text  # the catalog's own metrics are still there


def test_metrics_registry_is_per_app(tmp_path):
    with build_client(make_settings(tmp_path / "a")) as a, build_client(make_settings(tmp_path / "b")) as b:
        assert a.app.state.metrics_registry is not b.app.state.metrics_registry
        assert a.get("/metrics").status_code == 200 and b.get("/metrics").status_code == 200


def test_capabilities(client, app):
    with app.state.session_factory() as s:
        catalog.worker_heartbeat(s, worker_id="w1", hostname="h", hardware_class="cpu", capabilities={})
        s.commit()
    caps = client.get("/v1/capabilities").json()
    assert "Q8_0" in caps["formats"]["gguf"]["quantizations"]
    assert caps["engine_version"]
    by_name = {h["name"]: h for h in caps["hardware_classes"]}
    assert by_name["cpu"]["live_workers"] == 1 and by_name["cuda"]["live_workers"] == 0


def test_dashboard(client):
    r = client.get("/", headers={"Authorization": ""})  # the page itself holds no data: no key needed
    assert r.status_code == 200
    assert "text/html" in r.headers["content-type"]
    # Its script is a static file of this server (the page's CSP refuses inline scripts).
    assert '<script src="/static/dashboard.js">' in r.text and "<script>" not in r.text
    script = client.get("/static/dashboard.js", headers={"Authorization": ""}).text
    assert "/v1/jobs" in script and "/v1/artifacts" in script
    # Its API calls carry the key pasted into the page, kept in the tab's sessionStorage.
    assert "sessionStorage" in script and '"Authorization": "Bearer "' in script


def test_openapi(client):
    spec = client.get("/openapi.json").json()
    assert "/v1/jobs" in spec["paths"] and "/v1/sources" in spec["paths"]


def test_error_shapes(client):
    r = client.get("/v1/jobs/job_missing")
    assert r.status_code == 404
    assert set(r.json()) == {"error"} and r.json()["error"]["code"] == "job_not_found"
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.post("/v1/jobs", json={"source": "x", "targets": "gguf:Q8_0", "surprise": 1})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "validation_error" and "surprise" in err["message"]
    r = client.get("/v1/jobs", params={"limit": "many"})
    assert r.status_code == 422 and "limit" in r.json()["error"]["message"]
    r = client.delete("/v1/jobs")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_unhandled_error_is_500_json_without_trace(client, app, caplog):
    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals /etc/passwd")

    r = client.get("/boom", headers={"X-Request-ID": "req-500"})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert "secret" not in r.text and "Traceback" not in r.text
    assert r.headers["x-request-id"] == "req-500"
    assert any("secret internals" in str(rec.exc_info) for rec in caplog.records if rec.exc_info)


def test_api_import_does_not_load_heavy_modules():
    code = textwrap.dedent("""
        import sys
        import api.app
        from api.app import create_app
        heavy = [m for m in ("torch", "numpy", "gguf", "llama_cpp", "worker", "transformers",
                             "onnxruntime", "safetensors") if m in sys.modules]
        print(",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"api.app pulled in heavy modules: {out.stdout.strip()}"


def test_serving_does_not_load_heavy_modules(tmp_path):
    """The same after building the app and answering requests (lazy imports count too)."""
    code = textwrap.dedent(f"""
        import sys
        from fastapi.testclient import TestClient
        from quantyard import catalog
        from quantyard.settings import Settings
        from api.app import create_app
        s = Settings(data_dir={str(tmp_path / 'x')!r}, database_url=None, broker_url=None, storage_url=None,
                     auth="disabled")
        catalog.upgrade_database(s.resolved_database_url)
        with TestClient(create_app(s)) as c:
            for p in ("/v1/capabilities", "/v1/jobs", "/v1/artifacts", "/metrics", "/readyz", "/"):
                assert c.get(p).status_code == 200, p
        heavy = [m for m in ("torch", "numpy", "gguf", "llama_cpp", "worker") if m in sys.modules]
        print(",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"serving pulled in heavy modules: {out.stdout.strip()}"
