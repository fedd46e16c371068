"""Alert rules (deploy/prometheus/quantyard-rules.yml, the same as the PrometheusRule) and the
Grafana board: promtool checks and unit-tests the rules; a real Prometheus parses every
expression of the rules and of the board."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
import yaml

from tests.deploy import render
from tests.deploy.conftest import require_tool, start_prometheus

PROMETHEUS_DIR = render.ROOT / "deploy" / "prometheus"
GRAFANA_DIR = render.ROOT / "deploy" / "grafana"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = require_tool("promtool", "Debian package prometheus (scripts/test installs it)")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR)


def test_promtool_checks_the_rules_and_the_compose_config():
    for args in (("check", "rules", "quantyard-rules.yml"), ("check", "config", "--syntax-only", "prometheus.yml")):
        out = _promtool(*args)
        assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_unit_test_and_they_pass():
    alerts = {r["alert"] for g in yaml.safe_load((PROMETHEUS_DIR / "quantyard-rules.yml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROMETHEUS_DIR / "quantyard-rules.test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case["exp_alerts"]}
    assert alerts == tested, f"alerts without a firing test: {alerts - tested}"
    out = _promtool("test", "rules", "quantyard-rules.test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def _board_module():
    spec = importlib.util.spec_from_file_location("make_board", GRAFANA_DIR / "make_board.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_board_json_is_the_generated_one():
    board = _board_module()
    committed = json.loads((GRAFANA_DIR / "dashboards" / "quantyard.json").read_text())
    assert committed == board.board(), "regenerate: python deploy/grafana/make_board.py"
    titles = " | ".join(p["title"] for p in committed["panels"]).lower()
    for needed in ("queue", "live workers", "finished", "failure ratio by code", "p50", "p95", "in progress",
                   "api requests", "api latency", "5xx"):
        assert needed in titles, needed
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "quantyard.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    server = start_prometheus(tmp_path_factory.mktemp("prometheus"), {})
    yield server
    server.stop()


def test_every_expression_parses_in_prometheus(prometheus):
    rules = [r["expr"] for g in yaml.safe_load((PROMETHEUS_DIR / "quantyard-rules.yml").read_text())["groups"]
             for r in g["rules"]]
    exprs = rules + [e.replace("$__rate_interval", "1m") for e in _board_module().expressions()]
    assert len(exprs) > 15
    for expr in exprs:
        answer = prometheus.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
    assert prometheus.query("sum(rate(x[1m]) by")["status"] == "error"  # the parser does reject
