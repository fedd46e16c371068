"""Structured logs (QUANTYARD_LOG_FORMAT=json): one JSON object per line, carrying the ids that
let one job be followed across the API and the workers (`jq 'select(.job_id == "...")'`).

The ids live in a context variable, set for the duration of a request (api/middleware.py) or of
a task (worker/celery_app.py) with ``log_context``; every record logged meanwhile, by any logger,
carries them. Text mode (the default) leaves logging exactly as the servers set it up.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.config
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

ID_FIELDS = ("job_id", "target_id", "worker_id", "request_id")

_ids: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("quantyard_log_ids")
# Ids of the whole process (a worker's id): on every line, Celery's own outside a task too; a
# forked pool process inherits them.
_process_ids: dict[str, str] = {}


def _checked(ids: dict[str, str | None]) -> dict[str, str]:
    unknown = set(ids) - set(ID_FIELDS)
    if unknown:
        raise TypeError(f"log ids are only {', '.join(ID_FIELDS)}, not {', '.join(sorted(unknown))}")
    return {k: str(v) for k, v in ids.items() if v is not None}


def set_process_ids(**ids: str | None) -> None:
    """Every record this process logs from now on carries ``ids`` (a context's own win)."""
    _process_ids.update(_checked(ids))


@contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Every record logged inside the block (in this thread or task) carries ``ids`` (None:
    not known, left out); the ids of an enclosing block stay unless overridden."""
    token = _ids.set({**_ids.get({}), **_checked(ids)})
    try:
        yield
    finally:
        _ids.reset(token)


def current_ids() -> dict[str, str]:
    return dict(_ids.get({}))


class JsonFormatter(logging.Formatter):
    """time (ISO 8601, UTC), level, logger, message, the ids known (the context's, or a record's
    own ``extra={"job_id": ...}``), and ``exception`` / ``stack`` with the traceback text.

    Never raises: a log call with bad arguments or an unserialisable extra still gives a line."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            return json.dumps(self._fields(record), default=str, ensure_ascii=False)
        except Exception as exc:  # noqa: BLE001 - a log line must not take the process down
            return json.dumps({"time": _utc(getattr(record, "created", None)), "level": "ERROR",
                               "logger": "quantyard.logs",
                               "message": f"unformattable log record: {type(exc).__name__}: {exc}",
                               "record": _safe_repr(getattr(record, "msg", None))}, default=str)

    def _fields(self, record: logging.LogRecord) -> dict[str, Any]:
        out: dict[str, Any] = {"time": _utc(record.created), "level": record.levelname,
                               "logger": record.name, "message": _message(record)}
        out.update(_process_ids)
        out.update(_ids.get({}))
        for name in ID_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return out


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001 - e.g. "%d" with a string: keep what was meant
        return f"{record.msg!s} {record.args!r}"


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # noqa: BLE001
        return f"<unprintable {type(value).__name__}>"


def _utc(created: float | None) -> str:
    moment = datetime.fromtimestamp(created, timezone.utc) if created is not None else datetime.now(timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_logging_config(level: str = "INFO") -> dict[str, Any]:
    """A dictConfig: one stderr handler with the JSON formatter on the root logger, every other
    logger (uvicorn's included) propagating to it. Passed to uvicorn as ``log_config`` too, so
    each of its worker processes (spawned, not forked) sets it up again."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                                "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {name: {"handlers": [], "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")},
    }


def configure_logging(settings) -> None:
    """JSON mode: the root logger's handler writes JSON lines. Text mode: nothing changes."""
    if settings.log_format == "json":
        logging.config.dictConfig(json_logging_config())


def uvicorn_logging(settings) -> dict[str, Any]:
    """uvicorn.run's logging arguments: in JSON mode our config, uvicorn's own loggers at INFO
    (access lines carry the request id); in text mode uvicorn's default, warnings only."""
    if settings.log_format == "json":
        return {"log_config": json_logging_config(), "log_level": None}
    return {"log_level": "warning"}


def install_celery_json_logging(settings) -> None:
    """Celery replaces the root logger's handlers when the worker starts: put the JSON formatter
    on the handlers it made (root and task loggers; pool processes are forked with them)."""
    if settings.log_format != "json":
        return
    from celery.signals import after_setup_logger, after_setup_task_logger

    def use_json(logger: logging.Logger, **_: Any) -> None:
        for handler in logger.handlers:
            handler.setFormatter(JsonFormatter())

    after_setup_logger.connect(use_json, weak=False, dispatch_uid="quantyard-json-logs")
    after_setup_task_logger.connect(use_json, weak=False, dispatch_uid="quantyard-json-task-logs")
