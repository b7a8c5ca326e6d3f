"""Dependencies shared by the routes: settings, a request-scoped session, and loaders that 404."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.services import adapters as adapters_service
from api.services import evaluations as evaluations_service
from api.services import jobs as jobs_service
from core.auth import tenant_for_key
from core.bounds import MAX_INT32
from core.db import get_session_factory
from core.errors import Unauthenticated
from core.models import DEFAULT_TENANT_ID, Adapter, Evaluation, Job
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


# Validating dependencies: a route that takes a job, adapter or evaluation id gets the tenant's row, or the 404
# naming the path parameter, from one loader each (the services' own `..._or_404`, which other services reuse).
# FastAPI runs a dependency before it validates the route's own query and body, so a route that has those too
# (a job's events, an evaluation's samples, derive and merge) calls the loader in its body instead: a request
# wrong in both ways keeps its 422, as before.


def _tenants_job(session: SessionDep, tenant: TenantDep, job_id: str) -> Job:
    return jobs_service.get_job_or_404(session, tenant, job_id)


def _tenants_adapter(session: SessionDep, tenant: TenantDep, name: str) -> Adapter:
    return adapters_service.live_adapter_or_404(session, tenant, name)


def _tenants_evaluation(session: SessionDep, tenant: TenantDep, evaluation_id: str) -> Evaluation:
    return evaluations_service.get_evaluation_or_404(session, tenant, evaluation_id)


JobDep = Annotated[Job, Depends(_tenants_job)]
AdapterDep = Annotated[Adapter, Depends(_tenants_adapter)]  # not deleted, too
EvaluationDep = Annotated[Evaluation, Depends(_tenants_evaluation)]


@dataclass(frozen=True)
class Page:
    """Which page of a newest-first list: at most `limit` rows after the row whose id is `after`."""

    limit: int
    after: str | None


async def _page(
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=40)] = None,
) -> Page:
    return Page(limit=limit, after=after)


PageParams = Annotated[Page, Depends(_page)]

# A job's events are numbered: their cursor is an event id, and a page may be longer.
EventCursor = Annotated[int | None, Query(ge=0, le=MAX_INT32, description="Continue after this event id")]
EventLimit = Annotated[int, Query(ge=1, le=1000)]
