"""Idempotency-Key on create endpoints: same key and request -> the same resource; same key, other request -> 422."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, timedelta

from fastapi import Response
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import InvalidInput
from core.models import IdempotencyKey, utcnow
from core.repository import idempotency as idempotency_repo

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"


@dataclass(frozen=True)
class IdempotentRequest:
    tenant_id: str
    endpoint: str
    key: str
    request_sha256: str
    ttl_seconds: int


def idempotent_request(
    tenant_id: str, endpoint: str, key: str | None, parts: object, *, ttl_seconds: int
) -> IdempotentRequest | None:
    """The request's identity when the client sent a key; `parts` is its body as JSON-able data.

    Keys are per tenant, and a key is remembered for ttl_seconds: after that it is free again.
    """
    if key is None:
        return None
    return IdempotentRequest(
        tenant_id=tenant_id, endpoint=endpoint, key=key, request_sha256=request_sha256(parts), ttl_seconds=ttl_seconds
    )


def _expired(record: IdempotencyKey, ttl_seconds: int) -> bool:
    created = record.created_at if record.created_at.tzinfo else record.created_at.replace(tzinfo=UTC)  # SQLite
    return created < utcnow() - timedelta(seconds=ttl_seconds)


def request_sha256(parts: object) -> str:
    """sha256 of the request in canonical JSON, so key order and whitespace do not make it a different request."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def earlier_resource(session: Session, request: IdempotentRequest) -> str | None:
    """The id of the resource an earlier request with this key made, None if the key is new.

    The same key with a different request is a client bug (a reused key), refused with 422.
    """
    record = idempotency_repo.get_key(session, tenant_id=request.tenant_id, endpoint=request.endpoint, key=request.key)
    if record is None:
        return None
    if _expired(record, request.ttl_seconds):
        # Forget it now, in this transaction, so the insert of the new request's key does not collide.
        idempotency_repo.delete_key(session, record)
        return None
    if record.request_sha256 != request.request_sha256:
        raise InvalidInput(
            f"{HEADER} {request.key!r} was already used on {request.endpoint} with a different request; "
            "send a new key for a new request",
            param=HEADER,
            code="idempotency_key_reused",
        )
    return record.resource_id


def claim_key(session: Session, request: IdempotentRequest, resource_id: str) -> str | None:
    """Record the key for resource_id in the current transaction (the one that creates the resource).

    Call it before anything else is written in the transaction: when a concurrent request with the same
    key committed first, the unique (endpoint, key) refuses this insert, the transaction is rolled back
    and the winner's resource id is returned (or 422 when its request differed).
    """
    try:
        idempotency_repo.add_key(
            session,
            IdempotencyKey(
                tenant_id=request.tenant_id,
                endpoint=request.endpoint,
                key=request.key,
                request_sha256=request.request_sha256,
                resource_id=resource_id,
            ),
        )
        return None
    except IntegrityError:
        session.rollback()
        log.info("%s %s: a concurrent request with this key won; replaying its resource", request.endpoint, request.key)
    winner = earlier_resource(session, request)
    if winner is None:  # the constraint fired, so the row is committed; never None
        raise RuntimeError(f"idempotency key {request.key!r} on {request.endpoint} conflicted but is not stored")
    return winner


def mark_replayed(response: Response) -> None:
    """An earlier request's resource: 200 instead of 201, and a header that says so."""
    response.status_code = 200
    response.headers[REPLAYED_HEADER] = "true"
