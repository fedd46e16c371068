"""SQLAlchemy 2 models of the catalog. Portable between SQLite and Postgres.

Timestamps are timezone-aware UTC in Python (naive values are refused on write); JSON columns are
JSONB on Postgres and JSON text on SQLite. ``to_dict()`` gives the JSON the API returns.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import false as sa_false
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
TARGET_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
TERMINAL_TARGET_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
NODE_TYPES = ("source", "artifact")
GENESIS_HASH = "0" * 64

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value is not None else None


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite stores it as naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(postgresql.JSONB(), "postgresql")
# A list of strings: text[] on Postgres (GIN-indexable, per-element statistics), JSON on SQLite.
LabelPairsType = JSON().with_variant(postgresql.ARRAY(Text), "postgresql")


def _in(column: str, values) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Withdrawable:
    """Withdrawal flags shared by sources and artifacts. A withdrawn node's descendants carry the
    same flags, with ``withdrawn_root_*`` naming the node whose withdrawal reached them."""

    withdrawn_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    withdrawn_reason: Mapped[str | None] = mapped_column(Text)
    withdrawn_by: Mapped[str | None] = mapped_column(String(200))
    withdrawn_root_type: Mapped[str | None] = mapped_column(String(20))
    withdrawn_root_id: Mapped[str | None] = mapped_column(String(40))

    def withdrawal_dict(self) -> dict[str, Any]:
        if self.withdrawn_at is None:
            return {"withdrawn": False, "withdrawal": None}
        return {"withdrawn": True, "withdrawal": {
            "at": iso(self.withdrawn_at), "reason": self.withdrawn_reason, "by": self.withdrawn_by,
            "root": {"type": self.withdrawn_root_type, "id": self.withdrawn_root_id}}}


class Source(Withdrawable, Base):
    __tablename__ = "sources"
    __table_args__ = (
        Index(None, "sha256"),
        Index(None, "created_at", "id"),
        Index(None, "withdrawn_root_type", "withdrawn_root_id"),
        Index(None, "organization_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("src"))
    # The owning tenant. No FK (see migration 0003); NULL only for rows older than tenancy.
    organization_id: Mapped[str | None] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    uri: Mapped[str] = mapped_column(Text)
    storage_key: Mapped[str] = mapped_column(Text)
    architecture: Mapped[str | None] = mapped_column(String(200))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "uri": self.uri,
            "storage_key": self.storage_key,
            "architecture": self.architecture,
            "metadata": dict(self.meta or {}),
            "created_by": self.created_by,
            "created_at": iso(self.created_at),
            "organization_id": self.organization_id,
            **self.withdrawal_dict(),
        }


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
        Index(None, "created_at", "id"),
        Index(None, "status", "created_at"),
        Index(None, "hardware_class", "status"),
        Index(None, "source_id"),
        Index(None, "organization_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    organization_id: Mapped[str | None] = mapped_column(String(40))
    source_id: Mapped[str] = mapped_column(ForeignKey("sources.id"))
    status: Mapped[str] = mapped_column(String(20), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress_message: Mapped[str | None] = mapped_column(Text)
    hardware_class: Mapped[str] = mapped_column(String(50), default="cpu")
    labels: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    worker_id: Mapped[str | None] = mapped_column(String(200))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    warnings: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set once the preparing task has handed the targets to their own tasks.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    source: Mapped[Source] = relationship()
    targets: Mapped[list[JobTarget]] = relationship(
        back_populates="job", order_by="JobTarget.position", lazy="selectin", cascade="all, delete-orphan"
    )
    artifacts: Mapped[list[Artifact]] = relationship(
        lazy="selectin", order_by="Artifact.created_at", viewonly=True
    )

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_JOB_STATUSES

    def _targets_with_results(self) -> list[dict[str, Any]]:
        """Each target with `result`: its artifact's size, quality and speed in brief, when this
        job made it (a reused one is the other job's: see its artifact)."""
        from .frontier import artifact_result  # frontier reads these models

        made = {a.id: a for a in self.artifacts}
        out = []
        for t in self.targets:
            art = made.get(t.artifact_id) if t.artifact_id else None
            out.append({**t.to_dict(), "result": None if art is None else artifact_result(art)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source_id": self.source_id,
            "status": self.status,
            "progress": self.progress,
            "progress_message": self.progress_message,
            "hardware_class": self.hardware_class,
            "labels": dict(self.labels or {}),
            "targets": self._targets_with_results(),
            # The artifacts the targets asked for (an intermediate a job made on the way is
            # listed under intermediate_artifact_ids).
            "artifact_ids": [t.artifact_id for t in self.targets if t.artifact_id],
            # Of those, the ones an earlier job made (same recipe hash): nothing was converted.
            "reused_artifact_ids": [t.artifact_id for t in self.targets if t.artifact_id and t.reused],
            "intermediate_artifact_ids": [
                a.id for a in self.artifacts if a.target_id is None
                and a.id not in {t.artifact_id for t in self.targets}
            ],
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "cancel_requested": self.cancel_requested,
            "worker_id": self.worker_id,
            "lease_expires_at": iso(self.lease_expires_at),
            "error": {"code": self.error_code, "message": self.error_message} if self.error_code else None,
            "warnings": list(self.warnings or []),
            "created_by": self.created_by,
            "organization_id": self.organization_id,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }


class JobTarget(Base):
    __tablename__ = "job_targets"
    __table_args__ = (
        UniqueConstraint("job_id", "position"),
        CheckConstraint(_in("status", TARGET_STATUSES), name="status"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("tgt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(50))
    quantization: Mapped[str] = mapped_column(String(50))
    params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    estimate: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    # No FK: artifacts reference targets, a cycle would complicate inserts on every backend.
    artifact_id: Mapped[str | None] = mapped_column(String(40))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    worker_id: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The target was answered with an existing artifact of the same recipe (made by that job).
    reused: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    reused_from_job: Mapped[str | None] = mapped_column(String(40))

    job: Mapped[Job] = relationship(back_populates="targets")

    @property
    def key(self) -> str:
        return f"{self.format}:{self.quantization}"

    def to_spec_dict(self) -> dict[str, Any]:
        return {"format": self.format, "quantization": self.quantization, "params": dict(self.params or {})}

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "position": self.position,
            "key": self.key,
            "format": self.format,
            "quantization": self.quantization,
            "params": dict(self.params or {}),
            "status": self.status,
            "progress": self.progress,
            "estimate": self.estimate,
            "error": {"code": self.error_code, "message": self.error_message} if self.error_code else None,
            "artifact_id": self.artifact_id,
            "reused": bool(self.reused),
            "reused_from_job": self.reused_from_job,
            "attempts": self.attempts,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }


class Artifact(Withdrawable, Base):
    __tablename__ = "artifacts"
    __table_args__ = (
        Index(None, "created_at", "id"),
        Index(None, "format", "quantization"),
        Index(None, "source_id"),
        Index(None, "job_id"),
        Index(None, "sha256"),
        Index(None, "recipe_hash"),
        Index(None, "purge_after"),
        Index(None, "withdrawn_root_type", "withdrawn_root_id"),
        Index(None, "organization_id", "created_at", "id"),
        # Catalog search (catalog/search.py, migration 0006): org first, sort key and id last.
        Index(None, "organization_id", "format", "quantization", "created_at", "id"),
        Index(None, "organization_id", "architecture", "created_at", "id"),
        Index(None, "organization_id", "source_id", "created_at", "id"),
        Index(None, "organization_id", "size_bytes", "id"),
        Index(None, "organization_id", "mean_kl", "id"),
        # GIN on Postgres (text[] containment; pg_trgm for LIKE '%...%'); plain on SQLite.
        Index(None, "label_pairs", postgresql_using="gin"),
        Index(None, "search_text", postgresql_using="gin", postgresql_ops={"search_text": "gin_trgm_ops"}),
        Index(None, "search_tokens", postgresql_using="gin"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("art"))
    organization_id: Mapped[str | None] = mapped_column(String(40))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    target_id: Mapped[str | None] = mapped_column(ForeignKey("job_targets.id"))
    source_id: Mapped[str] = mapped_column(ForeignKey("sources.id"))
    format: Mapped[str] = mapped_column(String(50))
    quantization: Mapped[str] = mapped_column(String(50))
    filename: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    uri: Mapped[str] = mapped_column(Text)
    storage_key: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    engine_version: Mapped[str] = mapped_column(String(100))
    recipe_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Search columns, copies filled by record_artifact (catalog/search.py): the source's
    # architecture, the job's labels as "key=value", lower-cased names, and metrics out of `metrics`.
    architecture: Mapped[str | None] = mapped_column(String(200))
    label_pairs: Mapped[list[str] | None] = mapped_column(LabelPairsType, default=list)
    search_text: Mapped[str | None] = mapped_column(Text)
    search_tokens: Mapped[list[str] | None] = mapped_column(LabelPairsType, default=list)
    mean_kl: Mapped[float | None] = mapped_column(Float)
    top1_agreement: Mapped[float | None] = mapped_column(Float)
    cosine_min: Mapped[float | None] = mapped_column(Float)
    bits_per_weight: Mapped[float | None] = mapped_column(Float)
    # Retention (catalog/retention.py): soft delete, bytes purged after purge_after, legal hold.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    deleted_by: Mapped[str | None] = mapped_column(String(200))
    delete_reason: Mapped[str | None] = mapped_column(Text)
    purge_after: Mapped[datetime | None] = mapped_column(UTCDateTime())
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    legal_hold_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    legal_hold_by: Mapped[str | None] = mapped_column(String(200))
    legal_hold_reason: Mapped[str | None] = mapped_column(Text)

    def retention_dict(self) -> dict[str, Any]:
        hold = None
        if self.legal_hold_at is not None:
            hold = {"at": iso(self.legal_hold_at), "by": self.legal_hold_by, "reason": self.legal_hold_reason}
        return {
            "deleted": self.deleted_at is not None,
            "deletion": None if self.deleted_at is None else {
                "at": iso(self.deleted_at), "by": self.deleted_by, "reason": self.delete_reason,
                "purge_after": iso(self.purge_after), "purged_at": iso(self.purged_at)},
            "legal_hold": hold,
        }

    @property
    def key(self) -> str:
        return f"{self.format}:{self.quantization}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "job_id": self.job_id,
            "target_id": self.target_id,
            "source_id": self.source_id,
            "format": self.format,
            "quantization": self.quantization,
            "key": self.key,
            "filename": self.filename,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "uri": self.uri,
            "storage_key": self.storage_key,
            "metrics": dict(self.metrics or {}),
            "metadata": dict(self.meta or {}),
            "engine_version": self.engine_version,
            "recipe_hash": self.recipe_hash,
            "organization_id": self.organization_id,
            "created_at": iso(self.created_at),
            **self.withdrawal_dict(),
            **self.retention_dict(),
        }


class LineageEdge(Base):
    __tablename__ = "lineage_edges"
    __table_args__ = (
        CheckConstraint(_in("parent_type", NODE_TYPES), name="parent_type"),
        CheckConstraint(_in("child_type", NODE_TYPES), name="child_type"),
        Index(None, "parent_type", "parent_id"),
        Index(None, "child_type", "child_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("edg"))
    parent_type: Mapped[str] = mapped_column(String(20))
    parent_id: Mapped[str] = mapped_column(String(40))
    child_type: Mapped[str] = mapped_column(String(20))
    child_id: Mapped[str] = mapped_column(String(40))
    recipe: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    recipe_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent": {"type": self.parent_type, "id": self.parent_id},
            "child": {"type": self.child_type, "id": self.child_id},
            "recipe": dict(self.recipe or {}),
            "recipe_hash": self.recipe_hash,
            "created_at": iso(self.created_at),
        }


class AuditEvent(Base):
    """One append-only, hash-chained audit record. ``seq`` is gapless (1, 2, 3, ...)."""

    __tablename__ = "audit_events"
    __table_args__ = (
        UniqueConstraint("id"),
        # A hash can be the predecessor of one row only: a forked chain cannot be stored.
        UniqueConstraint("prev_hash"),
        Index(None, "resource_type", "resource_id"),
        Index(None, "at"),
        Index(None, "organization_id", "seq"),
    )

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False)
    id: Mapped[str] = mapped_column(String(40), default=lambda: new_id("aud"))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    resource_type: Mapped[str] = mapped_column(String(50))
    resource_id: Mapped[str | None] = mapped_column(String(200))
    outcome: Mapped[str] = mapped_column(String(50))
    request_id: Mapped[str | None] = mapped_column(String(200))
    source_ip: Mapped[str | None] = mapped_column(String(100))
    user_agent: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    # The caller's organisation (NULL for events older than tenancy and for system events).
    # Hashed only when set, so events written before the column existed still verify.
    organization_id: Mapped[str | None] = mapped_column(String(40))

    def hashed_fields(self) -> dict[str, Any]:
        """The fields the chain hash covers (everything except ``hash`` itself)."""
        return hashed_fields(self)

    def to_dict(self) -> dict[str, Any]:
        return {**self.hashed_fields(), "hash": self.hash}


HASHED_COLUMNS = (
    "seq", "id", "at", "actor", "action", "resource_type", "resource_id", "outcome",
    "request_id", "source_ip", "user_agent", "details", "prev_hash",
)


def hashed_fields(row) -> dict[str, Any]:
    """What an audit event's hash covers, from an AuditEvent or a row mapping keyed by column."""
    get = row.__getitem__ if hasattr(row, "__getitem__") else row.__getattribute__
    fields = {c: get(c) for c in HASHED_COLUMNS}
    fields["at"] = iso(fields["at"])
    fields["details"] = fields["details"] or {}
    return with_optional_hashed(fields, get)


# Hashed when not NULL only: a column added after events were chained must leave their hashes as
# they were computed (an event without it hashes exactly as before; setting it later breaks it).
OPTIONAL_HASHED_COLUMNS = ("organization_id",)


def with_optional_hashed(fields: dict[str, Any], get) -> dict[str, Any]:
    for c in OPTIONAL_HASHED_COLUMNS:
        try:
            value = get(c)
        except (KeyError, AttributeError):
            value = None
        if value is not None:
            fields[c] = value
    return fields


class Worker(Base):
    __tablename__ = "workers"
    __table_args__ = (Index(None, "hardware_class", "last_heartbeat_at"),)

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    hardware_class: Mapped[str] = mapped_column(String(50))
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "hostname": self.hostname,
            "hardware_class": self.hardware_class,
            "capabilities": dict(self.capabilities or {}),
            "started_at": iso(self.started_at),
            "last_heartbeat_at": iso(self.last_heartbeat_at),
        }


API_ROLES = ("viewer", "submitter", "maintainer", "admin")
DEFAULT_ORGANIZATION_ID = "org_default"
DEFAULT_ORGANIZATION_NAME = "default"


class Organization(Base):
    """A tenant: every source, job and artifact belongs to one; callers see only their own."""

    __tablename__ = "organizations"
    __table_args__ = (UniqueConstraint("name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("org"))
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created_at": iso(self.created_at)}


class ApiKey(Base):
    """An API key: a principal (name) with a role in one organisation. Only the key's sha256 is
    stored; the secret itself is shown once, when it is made."""

    __tablename__ = "api_keys"
    __table_args__ = (
        UniqueConstraint("key_hash"),
        CheckConstraint(_in("role", API_ROLES), name="role"),
        Index(None, "organization_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    key_hash: Mapped[str] = mapped_column(String(64))
    key_prefix: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_by: Mapped[str | None] = mapped_column(String(200))

    organization: Mapped[Organization] = relationship(lazy="joined")

    def to_dict(self) -> dict[str, Any]:
        """Never the hash: a listing shows the prefix, which is enough to tell keys apart."""
        return {
            "id": self.id,
            "organization_id": self.organization_id,
            "organization": self.organization.name if self.organization is not None else None,
            "name": self.name,
            "role": self.role,
            "key_prefix": self.key_prefix,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
            "created_by": self.created_by,
        }
