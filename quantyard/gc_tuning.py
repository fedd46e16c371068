"""The garbage collector in the long-running service processes (API, workers and their pool).

A process that has imported FastAPI, SQLAlchemy, Celery (and, in a worker, torch) holds some
10^5-10^6 container objects that live as long as it does, and a submission allocates a few
thousand short-lived ones (ORM state, pydantic models, JSON). With CPython's default thresholds
(700, 10, 10) an API process under a burst of submissions ran about one young collection per
request and a full one every few hundred requests, each walking the whole start-up heap again (55-125 ms
on a 2-core machine): 0.6-1.0 s of every ~4.5 s of API CPU (bench_load, measured with
gc.callbacks). Hence, once start-up is done:

- ``gc.freeze()``: what start-up made moves to the permanent generation, which collections skip
  (modules, classes, compiled queries: never garbage);
- a first-generation threshold of 20,000 allocations: most request objects are freed by reference
  counting before a collection sees them, so fewer, larger young collections do less work in
  all. Garbage in cycles still goes, a little later: 20,000 objects of a few hundred bytes wait
  at most, a few MB.

A Celery worker freezes in its main process before the pool forks (worker/celery_app.py): a
collection in a pool process would otherwise write to every shared page (copy-on-write).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def freeze_startup_heap() -> None:
    """Collect what start-up left behind, exempt every surviving object from later collections,
    and collect the young generation every YOUNG_THRESHOLD allocations instead of 700."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
