"""The catalog: sources, jobs, targets, artifacts, lineage, the audit chain and workers.

Transaction rule: **the caller owns the transaction.** Every function here takes a ``Session``
first and keyword-only arguments after it; it flushes its changes but never commits or rolls
back. Each mutating function writes its audit event in that same transaction, so the change and
its audit record are committed (or rolled back) together::

    factory = make_session_factory(make_engine(url))
    with factory.begin() as s:            # commits on success, rolls back on an exception
        job = create_job(s, source_id=..., targets=[...], hardware_class="cpu", labels={}, actor="key:ci")

Keep transactions short and do one audited mutation per transaction where you can: appending to
the audit chain takes a lock (Postgres advisory lock / SQLite write lock) held until commit, and
``claim_job``/``request_cancel``/``finish_job``/``record_artifact`` hold the job's row lock on
Postgres until commit.

Audited: create_source, create_job, request_cancel, claim_job (claims, and the failures or
cancellations it decides), set_target_status (when the status changes), record_artifact,
finish_job, withdraw and reinstate (and each descendant they change).
Not audited (telemetry): set_progress, renew_lease, worker_heartbeat.

Lookups by id return ``None`` when missing (``get_*``); mutations of a missing row raise
``NotFound``. Bad arguments raise ``InvalidArgument`` (a ValueError), bad cursors ``InvalidCursor``.
"""

from . import reconcile  # noqa: F401 - its table (reconciler_resends) belongs to Base.metadata
from .artifacts import (
    add_lineage_edge,
    assign_target_artifact,
    create_source,
    find_artifact_by_recipe,
    get_artifact,
    get_source,
    get_source_by_sha256,
    list_artifacts,
    record_artifact,
)
from .audit import AuditVerification, RequestInfo, audit_events, canonical_json, record_audit, verify_audit_chain
from .db import make_engine, make_session_factory, normalize_url, upgrade_database
from .errors import CatalogError, InvalidArgument, InvalidCursor, InvalidState, NotFound
from .identity import (
    Principal,
    authenticate,
    bootstrap_admin_key,
    create_api_key,
    create_organization,
    ensure_organization,
    get_api_key,
    get_organization,
    get_organization_by_name,
    list_api_keys,
    revoke_api_key,
)
from .jobs import (
    ClaimOutcome,
    SourceChanged,
    SourceFacts,
    claim_job,
    create_job,
    finish_job,
    get_job,
    list_jobs,
    note_lost_attempt,
    queue_depth,
    renew_lease,
    request_cancel,
    set_progress,
    set_target_status,
)
from .lineage import descendants, edge_recipe, lineage
from .models import (
    JOB_STATUSES,
    TARGET_STATUSES,
    TERMINAL_JOB_STATUSES,
    Artifact,
    AuditEvent,
    Base,
    Job,
    JobTarget,
    LineageEdge,
    Source,
    Worker,
)
from .retention import (
    RetentionConflict,
    delete_artifact,
    due_for_purge,
    purge_artifact,
    purge_due,
    release_legal_hold,
    restore_artifact,
    set_legal_hold,
)
from .reuse import recipe_digests, reusable_artifacts, reuse_artifact
from .search import search_artifacts
from .targets import (
    PREPARE_SHARE,
    add_job_warning,
    claim_target,
    close_abandoned,
    finish_target,
    hold_for_record,
    mark_dispatched,
    renew_target_lease,
    set_target_progress,
    settle_job,
)
from .withdrawal import (
    Withdrawn,
    check_not_withdrawn,
    reinstate,
    withdraw,
    withdraw_artifact,
    withdraw_source,
    withdrawal_of,
)
from .workers import live_workers, worker_heartbeat, worker_stopped

__all__ = [
    "Principal", "authenticate", "bootstrap_admin_key", "create_api_key", "create_organization",
    "ensure_organization", "get_api_key", "get_organization", "get_organization_by_name", "list_api_keys",
    "revoke_api_key",
    "JOB_STATUSES", "TARGET_STATUSES", "TERMINAL_JOB_STATUSES",
    "Artifact", "AuditEvent", "AuditVerification", "Base", "CatalogError", "ClaimOutcome",
    "InvalidArgument", "InvalidCursor", "InvalidState", "Job", "JobTarget", "LineageEdge", "NotFound",
    "RequestInfo", "Source", "SourceChanged", "SourceFacts", "Worker",
    "add_lineage_edge", "audit_events", "canonical_json", "claim_job", "create_job", "create_source",
    "find_artifact_by_recipe", "finish_job", "get_artifact", "get_job", "get_source", "get_source_by_sha256",
    "lineage", "list_artifacts", "search_artifacts", "list_jobs", "live_workers", "make_engine", "make_session_factory",
    "normalize_url", "queue_depth", "record_artifact", "record_audit", "renew_lease", "request_cancel",
    "set_progress", "set_target_status", "upgrade_database", "verify_audit_chain", "worker_heartbeat",
    "worker_stopped", "assign_target_artifact", "PREPARE_SHARE", "add_job_warning", "claim_target", "finish_target",
    "mark_dispatched", "renew_target_lease", "set_target_progress", "settle_job",
    "close_abandoned", "hold_for_record", "note_lost_attempt", "reconcile",
    "Withdrawn", "check_not_withdrawn", "reinstate", "descendants", "edge_recipe", "withdraw", "withdraw_artifact",
    "withdraw_source", "withdrawal_of",
    "RetentionConflict", "delete_artifact", "due_for_purge", "purge_artifact", "purge_due", "release_legal_hold",
    "restore_artifact", "set_legal_hold", "recipe_digests", "reusable_artifacts", "reuse_artifact",
]
