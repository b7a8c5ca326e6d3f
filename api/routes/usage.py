"""`GET /usage`: the tenant's current use against each of its quotas."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import UsageOut
from api.services import usage as service

router = APIRouter(tags=["usage"])


@router.get("/usage", response_model=UsageOut)
def get_usage(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> UsageOut:
    """Active jobs, evaluations and adapter operations (429 past their limits); adapters kept and bytes stored by
    kind (413 past their limits); each with its limit and the TUNESERVE_ setting that sets it."""
    return service.get_usage(session, settings, tenant)
