#!/bin/sh
# Entrypoint of every Quantyard image: `quantyard-entrypoint api|worker ...|db upgrade`.
#
# - prometheus-client multiprocess mode (the worker's prefork pool): the folder named by
#   PROMETHEUS_MULTIPROC_DIR must be empty when the processes start, or counters of a previous
#   run (a restarted container keeps its emptyDir) are added to the new ones.
# - exec: `quantyard` (Celery's or uvicorn's main process) becomes PID 1 and gets SIGTERM itself.
#   Celery answers SIGTERM with a warm shutdown: it takes no new message and lets the running
#   conversion finish; a task still running when the grace period ends is SIGKILLed with its
#   message unacknowledged (acks_late), so Redis redelivers it and the catalog's claim re-runs it.
#   A shell left in between would swallow the signal (sh does not forward it).
set -eu

if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
  mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
  find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -delete
fi

exec quantyard "$@"
