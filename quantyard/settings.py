"""The one settings class: every QUANTYARD_* environment variable is read here and nowhere else."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 8600


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUANTYARD_", extra="ignore")

    # Where the embedded default keeps its SQLite catalog, object store and broker folders.
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".quantyard")

    # Unset means "embedded": SQLite, a local directory, a filesystem broker.
    database_url: str | None = None
    broker_url: str | None = None
    storage_url: str | None = None
    # S3-compatible endpoint (MinIO, SeaweedFS); credentials come from the usual AWS_* variables.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"

    # json: one JSON object per log line with the job, target, worker and request ids
    # (quantyard/logs.py), as the images and manifests set it; text: the servers' usual lines.
    log_format: Literal["text", "json"] = "text"

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # Where CLI client commands send requests.
    server: str = f"http://127.0.0.1:{DEFAULT_PORT}"
    # required: every endpoint but /healthz, /readyz (and the static dashboard and /docs pages,
    # which hold no data) needs `Authorization: Bearer <key>`.
    # disabled: everyone is an admin of the default organisation; `quantyard serve` allows it only
    # while bound to a loopback address.
    auth: Literal["required", "disabled"] = "required"
    # An API process remembers a key it checked for this long (0: never): a key revoked through
    # another process or the CLI stops working here within this bound (at once through this one).
    auth_cache_s: float = Field(default=5.0, ge=0)
    # The key CLI client commands send (QUANTYARD_API_KEY).
    api_key: str | None = Field(default=None, repr=False)
    # A bearer token Prometheus may scrape /metrics with (QUANTYARD_METRICS_TOKEN), so a scraper
    # needs no API key; without it, /metrics takes a key of the operator's (default) organisation.
    metrics_token: str | None = Field(default=None, repr=False, min_length=24)

    max_upload_bytes: int = 50 * 1024**3
    # Model weights hardly compress, so an archive unpacks to about its own size; archives are
    # also refused past 100x compression (quantyard.archive.MAX_COMPRESSION_RATIO).
    max_unpacked_bytes: int = 64 * 1024**3
    max_archive_members: int = 10_000
    # Every request body but the source upload's (which streams to disk under max_upload_bytes):
    # job submissions with their labels and calibration text, key requests, reasons.
    max_json_body_bytes: int = Field(default=4 * 1024**2, ge=1024)
    # The API's catalog connections (Postgres): connect, statement and lock-wait timeouts and the
    # wait for a pooled connection, so a slow or frozen database answers 503 within seconds.
    db_connect_timeout_s: int = Field(default=5, ge=2)
    db_statement_timeout_s: float = Field(default=10.0, ge=0)
    db_lock_timeout_s: float = Field(default=5.0, ge=0)
    db_pool_timeout_s: float = Field(default=5.0, gt=0)
    # Quality reports (issue 13): how many chunks of 512 tokens of the evaluation text each GGUF
    # artifact is scored on (the second half of each); 0 scores the whole text (54 chunks of the
    # shipped one). The time grows linearly: about 1.3 s per chunk for SmolLM2 on 2 cores.
    evaluation_chunks: int = Field(default=16, ge=0, le=4096)
    # Speed per GGUF artifact on the worker that made it (issue 13): llama-bench's pp<N> and
    # tg<N> tests, `speed_repetitions` timed runs each after a warm-up (llama-bench: 5); 0 turns
    # the test off. About 30 s per artifact for a 1B model on 2 cores at the defaults.
    speed_repetitions: int = Field(default=3, ge=0, le=50)
    speed_n_prompt: int = Field(default=512, ge=1, le=16384)
    speed_n_gen: int = Field(default=128, ge=1, le=16384)
    # Per conversion (the worker's pool process): its memory (RLIMIT_DATA: heap and anonymous
    # mappings, not the memory-mapped model files), unset = 75% of RAM / worker_concurrency,
    # 0 = no limit; and its scratch folder, unset = 2 x (max_upload_bytes + max_unpacked_bytes),
    # 0 = no limit. Either limit hit fails the target with code resource_limit.
    conversion_memory_bytes: int | None = Field(default=None, ge=0)
    conversion_scratch_bytes: int | None = Field(default=None, ge=0)

    job_max_attempts: int = 3
    # Hard time limit of one conversion task; the broker's visibility timeout is kept above it
    # so Redis never redelivers a task that is still running.
    task_time_limit_s: int = 6 * 3600
    job_lease_s: int = 300
    # The reconciler (worker/reconciler.py): every worker checks this often (0: never) and one
    # leader at a time re-sends the message of a job or target that may have lost it: queued or
    # dispatched longer than reconcile_grace_s with no message waiting in the broker, or running
    # under a lease that has expired. A re-sent item is re-sent again after reconcile_grace_s.
    reconcile_interval_s: float = Field(default=30.0, ge=0)
    reconcile_grace_s: float = Field(default=120.0, gt=0)
    # A worker that cannot reach the catalog when a task starts waits for it (backoff) this long
    # before putting the message back on the queue for later, instead of failing and acking it.
    catalog_wait_s: float = Field(default=60.0, ge=0)
    worker_heartbeat_s: float = 10.0
    worker_stale_after_s: float = 60.0
    worker_concurrency: int = 1
    # Where a worker's main process serves its Prometheus metrics (worker/metrics.py; only with
    # PROMETHEUS_MULTIPROC_DIR set, as the images do).
    worker_metrics_port: int = Field(default=9600, ge=1, le=65535)
    # Workers anchor the audit chain's head in the object store this often (0: never). Events
    # after the newest anchor are what a database superuser could still cut off unnoticed, so
    # the window is short; an idle chain is not anchored again (one small object per interval
    # with activity).
    audit_anchor_interval_s: float = 300.0
    # ...and after this many events since the newest anchor (0: never), checked every few
    # seconds by workers and API processes off the request path; every API and worker process
    # also anchors when it shuts down. Together they bound what can be cut off the chain's tail.
    audit_anchor_every_events: int = Field(default=1000, ge=0)
    # How audited changes join the hash chain (Postgres; SQLite is always direct): deferred,
    # written beside the change in its transaction and chained in batches by each process's
    # background sealer moments after the commit (quantyard/catalog/audit_seal.py: the chain lock
    # is held once per batch), or direct, each appended under the chain lock in the change's own
    # transaction (one audited write at a time, service-wide).
    audit_chain: Literal["direct", "deferred"] = "deferred"
    # The database role the API and workers connect as (`quantyard db grant-app-role ROLE`):
    # `quantyard audit verify` checks it cannot UPDATE, DELETE or TRUNCATE audit_events.
    db_app_role: str | None = None
    # A deleted artifact's bytes stay this long (restore is possible until then), then are purged.
    retention_grace_s: float = 7 * 24 * 3600.0
    # Workers look for deleted artifacts whose grace period is over this often (0: never).
    retention_purge_interval_s: float = 3600.0
    # An S3 request that fails transiently (refused, reset, timeout, 5xx) is retried with
    # backoff for this long before the target fails with storage_unavailable.
    storage_retry_s: float = Field(default=60.0, ge=0)
    # Workers sweep this often (0: never): temporary objects (tmp/) older than
    # storage_temp_max_age_s that a killed or cut-off write left, and the scratch folders of
    # worker processes that are gone. The age stays far above the longest upload + copy.
    worker_sweep_interval_s: float = Field(default=600.0, ge=0)
    storage_temp_max_age_s: float = Field(default=6 * 3600.0, gt=0)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'catalog.db'}"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{self.data_dir / 'objects'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"

    @property
    def visibility_timeout_s(self) -> int:
        return self.task_time_limit_s + 600

    @property
    def is_embedded(self) -> bool:
        return self.broker_url is None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
