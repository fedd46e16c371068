"""The served API process freezes its start-up heap for the garbage collector and collects the
young generation less often (quantyard/gc_tuning.py); an app built in a test process does not
(tests build many apps in one process, whose objects must stay collectable)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from quantyard.gc_tuning import YOUNG_THRESHOLD

PROBE = textwrap.dedent("""
    import gc, json, sys
    from fastapi.testclient import TestClient
    from api.app import create_app
    from quantyard.settings import Settings

    settings = Settings(data_dir=sys.argv[1], auth="disabled")
    app = create_app(settings, auto_migrate=True, freeze_heap=sys.argv[2] == "served")
    before = gc.get_freeze_count()
    with TestClient(app) as client:
        status = client.get("/healthz").status_code
        print(json.dumps({"before": before, "frozen": gc.get_freeze_count(),
                          "young": gc.get_threshold()[0], "status": status}))
""")


def _probe(tmp_path, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / mode), mode], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_served_app_freezes_its_startup_heap(tmp_path):
    served = _probe(tmp_path, "served")
    assert served["status"] == 200
    assert served["before"] == 0
    # FastAPI, SQLAlchemy and Celery alone are tens of thousands of objects.
    assert served["frozen"] > 20_000, served
    assert served["young"] == YOUNG_THRESHOLD


def test_app_built_in_a_test_process_keeps_the_defaults(tmp_path):
    plain = _probe(tmp_path, "plain")
    assert plain["status"] == 200
    assert plain["frozen"] == 0
    assert plain["young"] == 700  # CPython's default
