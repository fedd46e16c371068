"""`quantyard worker-check`: is a worker on this host beating its heartbeat into the catalog?

The probe containers and images run (Kubernetes liveness/readiness, Docker HEALTHCHECK). A live
process proves nothing: a Celery consumer can stop pulling messages after a broker reconnect while
its process stays up. The heartbeat (worker/celery_app.py ``_HeartbeatStep``) is written from the
consumer's own event loop, so a fresh row for this host means the loop that takes work is alive.
"""

from __future__ import annotations

import socket
import sys

import click

from quantyard.settings import get_settings


def fresh_heartbeats(*, database_url: str, hostname: str, stale_after_s: float,
                     hardware_class: str | None = None) -> list[str]:
    """Ids of this host's workers whose heartbeat is younger than ``stale_after_s``."""
    from quantyard import catalog

    engine = catalog.make_engine(database_url)
    try:
        with catalog.make_session_factory(engine)() as s:
            live = catalog.live_workers(s, hardware_class=hardware_class, stale_after_s=stale_after_s)
            return [w.id for w in live if w.hostname == hostname]
    finally:
        engine.dispose()


@click.command("worker-check")
@click.option("--hardware-class", default=None, help="Only a worker serving this class counts.")
@click.option("--stale-after", "stale_after_s", type=float, default=None,
              help="Seconds (default QUANTYARD_WORKER_STALE_AFTER_S).")
def worker_check(hardware_class: str | None, stale_after_s: float | None) -> None:
    """Exit 0 when a worker on this host has a fresh heartbeat in the catalog, else 1."""
    settings = get_settings()
    hostname = socket.gethostname()
    try:
        ids = fresh_heartbeats(database_url=settings.resolved_database_url, hostname=hostname,
                               stale_after_s=stale_after_s or settings.worker_stale_after_s,
                               hardware_class=hardware_class)
    except Exception as exc:  # an unreachable catalog: the probe fails, saying why (no secrets)
        click.echo(f"worker-check: catalog unreachable ({type(exc).__name__})", err=True)
        sys.exit(1)
    if not ids:
        click.echo(f"worker-check: no fresh heartbeat from a worker on {hostname}", err=True)
        sys.exit(1)
    click.echo(f"worker-check: ok ({', '.join(ids)})")


if __name__ == "__main__":  # `python -m quantyard.worker_check`, the same command
    worker_check()
