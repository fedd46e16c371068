"""HTTP request metrics of the API, for the Grafana board's request rate, latency and 5xx panels
(deploy/grafana/make_board.py) and the alert rules.

``quantyard_http_requests_total{method, route, status}`` and
``quantyard_http_request_duration_seconds{method, route}``. ``route`` is the matched route's
template (``/v1/jobs/{job_id}``), never the raw path: ids in labels would grow without bound.

``quantyard api --workers N`` runs N uvicorn processes, and a scrape reaches one of them; with
``PROMETHEUS_MULTIPROC_DIR`` set (as the images and manifests do; the entrypoint empties it) the
values live in that folder and every process's scrape sums all of them (prometheus-client's
multiprocess mode). Without it, the values are this process's own.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

# Request latency: a submission takes milliseconds, an upload of a large model minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, float("inf"))
UNMATCHED = "unmatched"  # 404s of paths no route serves: one label value, whatever the path


class HttpMetrics:
    """The request counter and latency histogram of one app, registered for its /metrics."""

    def __init__(self, registry: CollectorRegistry):
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if folder:
            MultiProcessCollector(registry, path=folder)
        own = None if folder else registry  # multiprocess values are read from the folder
        self.requests = Counter("quantyard_http_requests", "HTTP requests answered by the API",
                                ["method", "route", "status"], registry=own)
        self.duration = Histogram("quantyard_http_request_duration_seconds",
                                  "Time from a request's arrival to the end of its answer",
                                  ["method", "route"], buckets=LATENCY_BUCKETS, registry=own)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(seconds)


class HttpMetricsMiddleware:
    """Pure ASGI: counts and times every HTTP answer (the outermost middleware's 500s included,
    as status 500 when no answer started)."""

    def __init__(self, app, *, metrics: HttpMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_seen(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            self.metrics.observe(scope.get("method", ""), route, status, time.perf_counter() - started)
