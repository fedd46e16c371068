"""Organisations (tenants) and API keys: make them, authenticate a secret, revoke, list.

A key's secret is ``qy_`` + 32 random bytes (urlsafe base64) from :mod:`secrets`. Only its
sha256 is stored: the secret has 256 bits of entropy, so nobody can guess or brute-force it from
the hash, and a slow password hash (bcrypt, argon2) would buy nothing while costing every request
a deliberate delay. The first 10 characters are kept as ``key_prefix`` so a listing can show
which key is which.

Same conventions as the rest of the catalog: keyword-only arguments, the caller commits, every
change is audited in the same transaction.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .audit import RequestInfo, record_audit
from .errors import InvalidArgument, NotFound
from .models import (
    API_ROLES,
    DEFAULT_ORGANIZATION_ID,
    DEFAULT_ORGANIZATION_NAME,
    ApiKey,
    Organization,
    new_id,
    utcnow,
)

SECRET_PREFIX = "qy_"
PREFIX_CHARS = 10
# Writing last_used_at on every request would turn reads into writes; once a minute is enough.
LAST_USED_RESOLUTION = timedelta(seconds=60)
# Role rank: a role can do everything the roles below it can.
ROLE_RANK = {role: rank for rank, role in enumerate(API_ROLES)}


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's principal name, its role and organisation."""

    organization_id: str
    name: str
    role: str
    key_id: str | None
    organization_name: str | None = None

    def has_role(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]

    @property
    def actor(self) -> str:
        """The audit actor string: the principal's name, qualified by its key."""
        return f"{self.name} (key {self.key_id})" if self.key_id else self.name


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_role(role: str) -> str:
    if role not in ROLE_RANK:
        raise InvalidArgument(f"unknown role {role!r}; valid roles: {', '.join(API_ROLES)}")
    return role


# ---------------------------------------------------------------------------------- organisations


def create_organization(s: Session, *, name: str, actor: str, request: RequestInfo | None = None) -> Organization:
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise InvalidArgument("an organisation name is 1-200 characters")
    if get_organization_by_name(s, name=name) is not None:
        raise InvalidArgument(f"an organisation called {name!r} exists already")
    org = Organization(id=new_id("org"), name=name, created_at=utcnow())
    s.add(org)
    s.flush()
    record_audit(s, actor=actor, action="organization.create", resource_type="organization", resource_id=org.id,
                 request=request, details={"name": name}, organization_id=org.id)
    return org


def get_organization(s: Session, *, organization_id: str) -> Organization | None:
    return s.get(Organization, organization_id)


def get_organization_by_name(s: Session, *, name: str) -> Organization | None:
    return s.execute(select(Organization).where(Organization.name == name)).scalars().first()


def ensure_organization(s: Session, *, name: str, actor: str, request: RequestInfo | None = None) -> Organization:
    """The organisation called ``name``, made (and audited) when missing."""
    org = get_organization_by_name(s, name=name)
    if org is None and name == DEFAULT_ORGANIZATION_NAME:
        org = s.get(Organization, DEFAULT_ORGANIZATION_ID)  # renamed default: still the default
    return org or create_organization(s, name=name, actor=actor, request=request)


# ---------------------------------------------------------------------------------------- keys


def create_api_key(
    s: Session,
    *,
    organization_id: str,
    name: str,
    role: str,
    actor: str,
    expires_at: datetime | None = None,
    request: RequestInfo | None = None,
) -> tuple[ApiKey, str]:
    """A new key and its secret. The secret is returned here and nowhere else, ever."""
    check_role(role)
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise InvalidArgument("a key's principal name is 1-200 characters")
    if s.get(Organization, organization_id) is None:
        raise NotFound(f"organisation {organization_id} not found")
    now = utcnow()
    if expires_at is not None and expires_at <= now:
        raise InvalidArgument("expires_at must be in the future")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=new_id("key"), organization_id=organization_id, name=name, role=role,
                 key_hash=hash_secret(secret), key_prefix=secret[:PREFIX_CHARS], created_at=now,
                 expires_at=expires_at, created_by=actor)
    s.add(key)
    s.flush()
    record_audit(s, actor=actor, action="key.create", resource_type="api_key", resource_id=key.id, request=request,
                 details={"name": name, "role": role, "key_prefix": key.key_prefix,
                          "expires_at": expires_at.isoformat() if expires_at else None},
                 organization_id=organization_id)
    return key, secret


def authenticate(s: Session, *, secret: str, now: datetime | None = None) -> Principal | None:
    """The principal behind ``secret``, or None for an unknown, expired or revoked key.

    Updates ``last_used_at`` (at most once a minute per key) in the caller's transaction."""
    if not secret or not secret.startswith(SECRET_PREFIX) or len(secret) > 200:
        return None
    key = s.execute(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret))).scalars().first()
    now = now or utcnow()
    if key is None or key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
        return None
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        s.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    return Principal(organization_id=key.organization_id, name=key.name, role=key.role, key_id=key.id,
                     organization_name=key.organization.name if key.organization else None)


def get_api_key(s: Session, *, key_id: str, organization_id: str | None = None) -> ApiKey | None:
    key = s.get(ApiKey, key_id)
    if key is None or (organization_id is not None and key.organization_id != organization_id):
        return None
    return key


def list_api_keys(s: Session, *, organization_id: str | None = None, include_revoked: bool = True) -> list[ApiKey]:
    """Oldest first; ``organization_id`` None lists every organisation's keys."""
    q = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if organization_id is not None:
        q = q.where(ApiKey.organization_id == organization_id)
    if not include_revoked:
        q = q.where(ApiKey.revoked_at.is_(None))
    return list(s.execute(q).scalars())


def revoke_api_key(s: Session, *, key_id: str, actor: str, organization_id: str | None = None,
                   request: RequestInfo | None = None) -> ApiKey:
    """Revoke a key (idempotent: revoking a revoked key changes nothing and is not re-audited).
    ``organization_id``: the key must belong to it (another organisation's key is NotFound)."""
    key = get_api_key(s, key_id=key_id, organization_id=organization_id)
    if key is None:
        raise NotFound(f"api key {key_id} not found")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        s.flush()
        record_audit(s, actor=actor, action="key.revoke", resource_type="api_key", resource_id=key.id,
                     request=request, details={"name": key.name, "role": key.role, "key_prefix": key.key_prefix},
                     organization_id=key.organization_id)
    return key


def count_api_keys(s: Session) -> int:
    from sqlalchemy import func

    return s.execute(select(func.count()).select_from(ApiKey)).scalar_one()


def bootstrap_admin_key(s: Session, *, actor: str = "system:bootstrap") -> tuple[ApiKey, str] | None:
    """On a catalog without any key: an admin key in the default organisation (and its secret).
    None when a key exists already, so it happens once per catalog."""
    if count_api_keys(s) > 0:
        return None
    org = ensure_organization(s, name=DEFAULT_ORGANIZATION_NAME, actor=actor)
    return create_api_key(s, organization_id=org.id, name="bootstrap-admin", role="admin", actor=actor)


__all__ = [
    "LAST_USED_RESOLUTION", "Principal", "ROLE_RANK", "SECRET_PREFIX", "authenticate", "bootstrap_admin_key",
    "check_role", "count_api_keys", "create_api_key", "create_organization", "ensure_organization", "get_api_key",
    "get_organization", "get_organization_by_name", "hash_secret", "list_api_keys", "revoke_api_key",
]
