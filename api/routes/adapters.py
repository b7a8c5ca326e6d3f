from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import SessionDep
from api.schemas import AdapterOut, ListResponse
from core.errors import NotFound
from core.repository import adapters as adapters_repo

router = APIRouter(prefix="/adapters", tags=["adapters"])


@router.get("", response_model=ListResponse[AdapterOut])
def list_adapters(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=40)] = None,
) -> ListResponse[AdapterOut]:
    rows, has_more = adapters_repo.list_adapters(session, limit=limit, after=after)
    return ListResponse[AdapterOut](data=[AdapterOut.of(a) for a in rows], has_more=has_more)


@router.get("/{name}", response_model=AdapterOut)
def get_adapter(session: SessionDep, name: str) -> AdapterOut:
    adapter = adapters_repo.get_adapter_by_name(session, name)
    if adapter is None or adapter.status.value == "deleted":
        raise NotFound(f"no adapter named {name!r}", param="name")
    return AdapterOut.of(adapter)
