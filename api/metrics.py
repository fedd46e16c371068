"""Prometheus metrics computed from the catalog at scrape time.

A custom collector reads the catalog, so every API replica reports the same, correct numbers
whatever process (API or worker) changed a job. Each app gets its own CollectorRegistry.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from api import stats
from quantyard import catalog
from quantyard.engine.manifest import MANIFEST

log = logging.getLogger("quantyard.api")

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, float("inf"))
OUTCOMES = ("succeeded", "failed", "cancelled")


class CatalogCollector:
    def __init__(self, session_factory, settings):
        self.session_factory = session_factory
        self.settings = settings

    def describe(self):
        # Declared without reading the catalog (registration must not touch the database).
        return [
            CounterMetricFamily("quantyard_jobs_submitted", "Jobs submitted", labels=["hardware_class"]),
            CounterMetricFamily("quantyard_jobs_finished", "Jobs finished", labels=["outcome"]),
            HistogramMetricFamily("quantyard_job_duration_seconds", "Job run time", labels=["outcome"]),
            GaugeMetricFamily("quantyard_queue_depth", "Queued jobs", labels=["hardware_class"]),
            GaugeMetricFamily("quantyard_jobs_running", "Running jobs", labels=["hardware_class"]),
            GaugeMetricFamily("quantyard_workers_live", "Live workers", labels=["hardware_class"]),
            GaugeMetricFamily("quantyard_catalog_up", "Whether the catalog answered this scrape"),
            CounterMetricFamily("quantyard_reconciler_resends", "Messages the reconciler re-sent", labels=["kind"]),
        ]

    def collect(self):
        up = GaugeMetricFamily("quantyard_catalog_up", "Whether the catalog answered this scrape")
        try:
            with self.session_factory() as s:
                submitted = stats.jobs_by_hardware_class(s)
                finished = stats.finished_by_outcome(s)
                durations = stats.finished_durations(s)
                running = stats.running_by_hardware_class(s)
                depth = catalog.queue_depth(s)
                workers = catalog.live_workers(s, stale_after_s=self.settings.worker_stale_after_s)
                resends = catalog.reconcile.resend_counts(s)
        except Exception:  # a scrape must not fail because the catalog is down
            log.warning("metrics: catalog unavailable", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        classes = sorted(set(MANIFEST["hardware_classes"]) | set(submitted) | set(depth) | set(running))

        c = CounterMetricFamily("quantyard_jobs_submitted", "Jobs submitted (from the catalog)",
                                labels=["hardware_class"])
        for hc in classes:
            c.add_metric([hc], submitted.get(hc, 0))
        yield c

        c = CounterMetricFamily("quantyard_jobs_finished", "Jobs finished, by outcome (from the catalog)",
                                labels=["outcome"])
        for outcome in sorted(set(OUTCOMES) | set(finished)):
            c.add_metric([outcome], finished.get(outcome, 0))
        yield c

        h = HistogramMetricFamily("quantyard_job_duration_seconds",
                                  "Run time (started to finished) of finished jobs", labels=["outcome"])
        for outcome in OUTCOMES:
            values = [d for o, d in durations if o == outcome]
            buckets = []
            for bound in DURATION_BUCKETS:
                le = "+Inf" if bound == float("inf") else str(float(bound))
                buckets.append((le, sum(1 for v in values if v <= bound)))
            h.add_metric([outcome], buckets, sum_value=sum(values))
        yield h

        g = GaugeMetricFamily("quantyard_queue_depth", "Queued jobs per hardware class", labels=["hardware_class"])
        for hc in classes:
            g.add_metric([hc], depth.get(hc, 0))
        yield g

        g = GaugeMetricFamily("quantyard_jobs_running", "Running jobs per hardware class", labels=["hardware_class"])
        for hc in classes:
            g.add_metric([hc], running.get(hc, 0))
        yield g

        live: dict[str, int] = {}
        for w in workers:
            live[w.hardware_class] = live.get(w.hardware_class, 0) + 1
        g = GaugeMetricFamily("quantyard_workers_live", "Workers with a fresh heartbeat", labels=["hardware_class"])
        for hc in sorted(set(classes) | set(live)):
            g.add_metric([hc], live.get(hc, 0))
        yield g

        # Lost messages sent again by the workers' reconciler (worker/reconciler.py), per kind:
        # queued_job, expired_job, pending_target, expired_target.
        c = CounterMetricFamily("quantyard_reconciler_resends", "Messages the reconciler re-sent (from the catalog)",
                                labels=["kind"])
        for kind, n in sorted(resends.items()):
            c.add_metric([kind], n)
        yield c
        yield up


def make_registry(session_factory, settings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogCollector(session_factory, settings))
    return registry
