"""API keys: make (the secret is in the response, once), list, revoke. Admins only.

An admin manages its own organisation's keys. The operator (an admin of the default
organisation, the team running the service) may also make keys in another organisation by
name, creating it on first use: that is how a new tenant gets its first admin.
"""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from api.auth import is_operator, requires
from api.deps import actor, get_session, mark_audit, principal, request_info
from api.errors import ApiError, not_found
from api.responses import JSONResponse
from quantyard import catalog
from quantyard.catalog.models import API_ROLES, utcnow

router = APIRouter(prefix="/v1/keys", tags=["keys"])

MAX_EXPIRY_DAYS = 3650


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=200, description="the principal: a person or a pipeline")
    role: str = Field(..., description=" | ".join(API_ROLES))
    expires_in_days: float | None = Field(None, gt=0, le=MAX_EXPIRY_DAYS, description="none: never expires")
    organization: str | None = Field(None, min_length=1, max_length=200,
                                     description="another organisation's name (operator only)")


@router.post("", status_code=201, summary="Make an API key (the secret is shown in this response only)",
             dependencies=[requires("admin")])
def create_key(body: KeyCreate, request: Request, s: Session = Depends(get_session)):
    mark_audit(request, "key.create", "api_key")
    caller = principal(request)
    if body.role not in API_ROLES:
        raise ApiError(422, "validation_error", f"role must be one of {', '.join(API_ROLES)}")
    org_id = caller.organization_id
    if body.organization is not None and body.organization != caller.organization_name:
        if not is_operator(caller):
            raise ApiError(403, "forbidden", "only an admin of the default organisation makes keys in another "
                           "organisation")
        org_id = catalog.ensure_organization(s, name=body.organization, actor=actor(request),
                                             request=request_info(request)).id
    expires_at = utcnow() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    key, secret = catalog.create_api_key(s, organization_id=org_id, name=body.name, role=body.role,
                                         expires_at=expires_at, actor=actor(request), request=request_info(request))
    s.commit()
    s.refresh(key)
    return JSONResponse({**key.to_dict(), "secret": secret}, status_code=201,
                        headers={"Location": f"/v1/keys/{key.id}", "Cache-Control": "no-store"})


@router.get("", summary="The organisation's API keys (never their secrets)", dependencies=[requires("admin")])
def list_keys(request: Request, s: Session = Depends(get_session)):
    keys = catalog.list_api_keys(s, organization_id=principal(request).organization_id)
    return {"items": [k.to_dict() for k in keys]}


@router.delete("/{key_id}", summary="Revoke an API key (it stops working at once)", dependencies=[requires("admin")])
def revoke_key(key_id: str, request: Request, s: Session = Depends(get_session)):
    mark_audit(request, "key.revoke", "api_key", key_id)
    org = principal(request).organization_id
    if catalog.get_api_key(s, key_id=key_id, organization_id=org) is None:
        raise not_found("api_key", key_id)
    key = catalog.revoke_api_key(s, key_id=key_id, organization_id=org, actor=actor(request),
                                 request=request_info(request))
    s.commit()
    s.refresh(key)
    return key.to_dict()
