"""Writes deploy/grafana/dashboards/quantyard.json, the Quantyard Grafana board (schemaVersion 39).

    python deploy/grafana/make_board.py        # after editing PANELS

Metric sources: the API reads the catalog at scrape time (quantyard_queue_depth,
quantyard_workers_live, quantyard_jobs_*: every replica reports the same, hence max); the workers
export conversion metrics (worker/metrics.py). Every expression is checked by tests/deploy against
a real Prometheus.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "quantyard.json"
RATE = "$__rate_interval"

# (title, unit, [(legend, expr)], width)
PANELS: list[tuple[str, str, list[tuple[str, str]], int]] = [
    ("Queued jobs per hardware class (catalog)", "short",
     [("{{hardware_class}}", "max by (hardware_class) (quantyard_queue_depth)")], 8),
    ("Waiting messages per queue (Redis list, what KEDA scales on)", "short",
     [("convert.{{hardware_class}}", "max by (hardware_class) (quantyard_broker_queue_length)")], 8),
    ("Live workers per hardware class", "short",
     [("{{hardware_class}}", "max by (hardware_class) (quantyard_workers_live)")], 8),
    ("Conversions finished per minute", "short",
     [("{{format}} {{quantization}} {{outcome}}",
       f"sum by (format, quantization, outcome) (rate(quantyard_conversions_finished_total[{RATE}])) * 60")], 12),
    ("Jobs finished per minute (catalog)", "short",
     [("{{outcome}}", f"max by (outcome) (rate(quantyard_jobs_finished_total[{RATE}])) * 60")], 12),
    ("Failure ratio by code (1h)", "percentunit",
     [("{{code}}", 'sum by (code) (increase(quantyard_conversions_finished_total{outcome="failed"}[1h]))'
                   " / scalar(sum(increase(quantyard_conversions_finished_total[1h])))")], 12),
    ("Conversions in progress", "short",
     [("{{hardware_class}}", "sum by (hardware_class) (quantyard_conversions_in_progress)")], 12),
    ("Stage duration p50", "s",
     [("{{stage}}", f"histogram_quantile(0.5, sum by (le, stage) (rate(quantyard_stage_duration_seconds_bucket[{RATE}])))")],
     12),
    ("Stage duration p95", "s",
     [("{{stage}}", f"histogram_quantile(0.95, sum by (le, stage) (rate(quantyard_stage_duration_seconds_bucket[{RATE}])))")],
     12),
    ("Bytes read and written per second", "Bps",
     [("read {{format}}", f"sum by (format) (rate(quantyard_conversion_bytes_read_total[{RATE}]))"),
      ("written {{format}}", f"sum by (format) (rate(quantyard_conversion_bytes_written_total[{RATE}]))")], 12),
    ("Jobs running past their lease", "short",
     [("{{hardware_class}}", "max by (hardware_class) (quantyard_jobs_lease_expired)")], 12),
    ("API requests per second", "reqps",
     [("{{method}} {{status}}", f"sum by (method, status) (rate(quantyard_http_requests_total[{RATE}]))")], 8),
    ("API latency p50 / p95", "s",
     [("p50", f"histogram_quantile(0.5, sum by (le) (rate(quantyard_http_request_duration_seconds_bucket[{RATE}])))"),
      ("p95", f"histogram_quantile(0.95, sum by (le) (rate(quantyard_http_request_duration_seconds_bucket[{RATE}])))")], 8),
    ("API 5xx ratio", "percentunit",
     [("5xx", f'sum(rate(quantyard_http_requests_total{{status=~"5.."}}[{RATE}]))'
              f" / sum(rate(quantyard_http_requests_total[{RATE}]))")], 8),
]


def panel(i: int, x: int, y: int, title: str, unit: str, targets: list[tuple[str, str]], width: int) -> dict:
    return {
        "id": i + 1, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + n), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for n, (legend, expr) in enumerate(targets)],
    }


def board() -> dict:
    panels, x, y = [], 0, 0
    for i, (title, unit, targets, width) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(panel(i, x, y, title, unit, targets, width))
        x += width
    return {
        "uid": "quantyard", "title": "Quantyard", "tags": ["quantyard"], "schemaVersion": 39, "version": 1,
        "editable": False, "timezone": "utc", "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus", "current": {}}]},
        "annotations": {"list": []}, "panels": panels,
    }


def expressions() -> list[str]:
    return [expr for _, _, targets, _ in PANELS for _, expr in targets]


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(board(), indent=2) + "\n")
