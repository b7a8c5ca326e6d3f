"""API keys: minted once (only the sha256 is kept), looked up by hash, revoked by id."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy.orm import Session

from core.errors import InvalidInput, NotFound, Unauthenticated
from core.models import ApiKey, Tenant
from core.repository import tenants as tenants_repo

KEY_PREFIX = "tsk_"
PREFIX_SHOWN = 12


@dataclass(frozen=True)
class MintedKey:
    id: str
    tenant: str
    secret: str


def key_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_tenant(session: Session, name: str) -> Tenant:
    if tenants_repo.get_tenant_by_name(session, name) is not None:
        raise InvalidInput(f"a tenant named {name!r} exists", param="name", code="tenant_exists")
    return tenants_repo.add_tenant(session, Tenant(name=name))


def mint_key(session: Session, tenant_name: str, *, label: str = "") -> MintedKey:
    """A new key for the tenant; the secret is returned here once and never stored."""
    tenant = tenants_repo.get_tenant_by_name(session, tenant_name)
    if tenant is None:
        raise NotFound(f"no tenant named {tenant_name!r}", param="tenant")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = tenants_repo.add_key(
        session, ApiKey(tenant_id=tenant.id, label=label, prefix=secret[:PREFIX_SHOWN], key_sha256=key_sha256(secret))
    )
    return MintedKey(id=key.id, tenant=tenant.name, secret=secret)


def tenant_for_key(session: Session, secret: str) -> str:
    """The tenant id a bearer key belongs to; Unauthenticated when it is unknown or revoked."""
    key = tenants_repo.active_key_by_sha256(session, key_sha256(secret))
    if key is None:
        raise Unauthenticated("the API key is not valid (unknown or revoked)", param="Authorization")
    return key.tenant_id
