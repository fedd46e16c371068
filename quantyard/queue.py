"""Celery configuration shared by the API (which only sends) and the workers (which consume).

Kept in the core so the API can enqueue work by task name without importing the worker package.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

from celery import Celery
from celery.utils.nodenames import anon_nodename

import quantyard.engine.plan
from quantyard.settings import Settings

CONVERT_TASK = "quantyard.convert_job"
CONVERT_TARGET_TASK = "quantyard.convert_target"

log = logging.getLogger(__name__)


def queue_name(hardware_class: str) -> str:
    return f"convert.{hardware_class}"


def celery_config(settings: Settings) -> dict:
    visibility = settings.visibility_timeout_s
    transport_options: dict = {"visibility_timeout": visibility}
    if settings.resolved_broker_url.startswith("filesystem"):
        # The embedded broker: messages are files in one folder that sender and worker share.
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            # kombu otherwise writes its exchange bindings to ./control in the working directory.
            "control_folder": str(folder / "control"),
        }
    return {
        "broker_url": settings.resolved_broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # Job state lives in the catalog; Celery results are neither durable nor needed.
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        # A task is acknowledged only when done, and requeued if its process dies; the hard
        # limit stays below the visibility timeout so Redis never hands a live task to a second
        # worker. The attempt counter in the catalog stops redelivery loops.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": max(settings.task_time_limit_s - 60, 1),
        "task_default_queue": queue_name("cpu"),
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


def make_celery(settings: Settings, *, name: str = "quantyard") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


def enqueue_job(app: Celery, *, job_id: str, hardware_class: str) -> None:
    """Send a conversion job to the queue of its hardware class (raises if the broker is down)."""
    app.send_task(
        CONVERT_TASK,
        args=[job_id],
        queue=queue_name(hardware_class),
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
    )


class JobDispatcher:
    """Sends ``convert_job`` messages for the API from one background thread, each gathered batch
    in one broker round trip (kombu's ``Producer.batch``: a Redis pipeline).

    ``send`` blocks its caller until its message is in the broker or definitely failed, so a 202
    still means "queued in the broker" and a broker that is down still answers 503 (the route
    marks the job failed); only the work is shared: concurrent submissions travel together
    instead of each paying a publish of its own. A message is retried like ``enqueue_job``'s
    (``PUBLISH_RETRY_S``) before its sender hears the error."""

    PUBLISH_RETRY_S = (0.2, 0.5)
    MAX_BATCH = 256
    # How long the first message of a batch waits for company: a little latency for less CPU
    # (each batch costs kombu a Redis client and a pipeline).
    GATHER_S = 0.002

    def __init__(self, app: Celery):
        self.app = app
        self._queue: queue.SimpleQueue[tuple[str, str, Future[None]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._declared: set[str] = set()
        self._origin = anon_nodename()

    def send(self, *, job_id: str, hardware_class: str, timeout_s: float = 30.0) -> None:
        """Queue one job's message; returns once the broker has it (raises what publishing raised)."""
        done: Future[None] = Future()
        self._ensure_thread()
        self._queue.put((job_id, hardware_class, done))
        done.result(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Publish what was handed over, then stop the thread."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout_s)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="job-dispatcher", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is not None:
                time.sleep(self.GATHER_S)  # let concurrent submissions join this batch
            batch, stop = ([] if first is None else [first]), first is None
            while len(batch) < self.MAX_BATCH and not stop:  # whatever arrived meanwhile goes too
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                self._publish_with_retries(batch)
            if stop:
                return

    def _publish_with_retries(self, batch: list[tuple[str, str, Future[None]]]) -> None:
        for wait_s in (*self.PUBLISH_RETRY_S, None):
            try:
                self._publish(batch)
            except Exception as exc:  # noqa: BLE001 - handed to every sender of the batch
                if wait_s is not None:
                    time.sleep(wait_s)
                    continue
                for _, _, done in batch:
                    done.set_exception(exc)
                return
            for _, _, done in batch:
                done.set_result(None)
            return

    def _publish(self, batch: list[tuple[str, str, Future[None]]]) -> None:
        """Celery's own message (``amqp.create_task_message``: protocol 2, what ``send_task``
        sends), published to the queue straight (the anonymous direct exchange, as ``send_task``
        routes a plain queue name); each queue is declared on its first message only."""
        amqp, conf = self.app.amqp, self.app.conf
        declared = set()
        with self.app.producer_or_acquire() as producer, producer.batch():
            for job_id, hardware_class, _ in batch:
                qname = queue_name(hardware_class)
                # origin and the argument reprs given: Celery would work them out for every message
                headers, properties, body, _sent = amqp.create_task_message(
                    uuid.uuid4().hex, CONVERT_TASK, args=[job_id], ignore_result=conf.task_ignore_result,
                    origin=self._origin, argsrepr=repr([job_id]), kwargsrepr="{}")
                declare = None if qname in self._declared else [amqp.queues[qname]]
                producer.publish(body, exchange="", routing_key=qname, serializer=conf.task_serializer,
                                 delivery_mode=conf.task_default_delivery_mode, headers=headers, declare=declare,
                                 retry=False, **properties)
                declared.add(qname)
        self._declared |= declared  # only once the batch reached the broker


def enqueue_target(app: Celery, *, job_id: str, target_id: str, task: quantyard.engine.plan.TargetTask,
                   hardware_class: str) -> None:
    """Send one target of a prepared job to its own task (workers of the same class): its step
    of the job's conversion plan, serialised (the task parses it strictly again)."""
    app.send_task(
        CONVERT_TARGET_TASK,
        args=[job_id, target_id, task.to_dict()],
        queue=queue_name(hardware_class),
        retry=True,
        retry_policy={"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5},
    )


def broker_ping(app: Celery, *, timeout: float = 2.0) -> None:
    """Raise if the broker cannot be reached (used by /readyz)."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)


def waiting_message_ids(app: Celery, hardware_classes: list[str]) -> set[str] | None:
    """Ids of the jobs (``convert_job`` messages) and targets (``convert_target``) whose message
    waits in the queues of ``hardware_classes`` now, for the reconciler; None when this broker
    cannot be read this way (then the reconciler goes by time and worker capacity alone).

    Redis: the queue lists (messages a worker has taken, running or held for a countdown, are
    not in them). The embedded filesystem broker: the message files in its folder."""
    url = str(app.conf.broker_url or "")
    queues = [queue_name(c) for c in hardware_classes]
    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            return _redis_waiting(app, queues)
        if url.startswith("filesystem"):
            return _folder_waiting(app, queues)
    except Exception as exc:  # an unreadable broker only makes the reconciler less precise
        log.warning("could not read the broker's queues: %s: %s", type(exc).__name__, exc)
    return None


def _redis_waiting(app: Celery, queues: list[str]) -> set[str]:
    ids: set[str] = set()
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        client = channel.client
        for queue in queues:
            # kombu keeps one list per priority step; an unprioritised message is in the plain name
            for key in {channel._q_for_pri(queue, p) for p in channel.priority_steps}:
                for raw in client.lrange(key, 0, -1):
                    ids.update(_message_ids(raw))
    return ids


def _folder_waiting(app: Celery, queues: list[str]) -> set[str]:
    folder = Path(app.conf.broker_transport_options["data_folder_in"])
    suffixes = tuple(f".{q}.msg" for q in queues)
    ids: set[str] = set()
    for path in folder.iterdir():
        if path.name.endswith(suffixes):
            try:
                ids.update(_message_ids(path.read_bytes()))
            except OSError:  # taken by a worker meanwhile
                continue
    return ids


def _message_ids(raw: bytes | str) -> set[str]:
    """The job id (convert_job) or target id (convert_target) a kombu message carries."""
    try:
        message = json.loads(raw)
        task = (message.get("headers") or {}).get("task")
        body = message.get("body")
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]  # Celery protocol 2: [args, kwargs, embed]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return set()
    if task == CONVERT_TASK and args:
        return {str(args[0])}
    if task == CONVERT_TARGET_TASK and len(args) >= 2:
        return {str(args[1])}
    return set()
