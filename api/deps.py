"""Dependencies shared by the routes: settings, a request-scoped session, and loaders that 404."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from core.auth import tenant_for_key
from core.db import get_session_factory
from core.errors import Unauthenticated
from core.models import DEFAULT_TENANT_ID
from core.settings import Settings


async def get_app_settings(request: Request) -> Settings:
    # async: FastAPI runs a plain `def` dependency in the thread pool, a hop on every request for an attribute read.
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    """A session that commits when the route function returned and rolls back when it raised.

    Scoped to the route function (below), so the commit happens before the response is sent: a 201 means the row
    is committed and the client's very next request sees it (invariant 6). With FastAPI's default ("request")
    scope the code after `yield` runs after the response went out, and a failed commit would be a lie already told.
    It also means no request holds a database connection while it streams.
    """
    session = get_session_factory(settings.database_url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db, scope="function")]

# auto_error=False: a missing key is our 401 in the one error shape, not FastAPI's 403.
bearer = HTTPBearer(auto_error=False, description="A tenant's API key (`tuneserve admin create-key`)")


def current_tenant(
    settings: SettingsDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The tenant id every query of the request is scoped to: the key's tenant, or the default one with auth off."""
    if not settings.auth_enabled:
        return DEFAULT_TENANT_ID
    if credentials is None:
        raise Unauthenticated(
            "send an API key: Authorization: Bearer <key>", param="Authorization", code="missing_api_key"
        )
    tenant_id = tenant_for_key(session, credentials.credentials)
    # End the read's transaction: its connection goes back to the pool instead of being held while the route
    # reads an upload from a slow client or waits on serving (invariant 6). The route's own queries take one again.
    session.commit()
    return tenant_id


TenantDep = Annotated[str, Depends(current_tenant)]


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[!-~]+$",
        description="Any unique string (e.g. a UUID; visible ASCII, at most 255): a retry with the same key and "
        "request returns the resource the first one made (200, Idempotent-Replayed: true)",
    ),
]
