"""Fair dispatch: which waiting record a free worker claims next, across tenants and kinds of work.

A message on the broker is a wake-up that names a record, not an order to run that record: the worker claims the
fairly next one (docs/architecture.md, "Fair scheduling"). Tenants with waiting work take turns: the one with the
fewest records running goes first, then the one served least recently, then the one waiting longest; within the
tenant its oldest waiting record (first in, first out). A tenant at `tenant_max_running_work` is skipped.
One message per waiting record is still sent and re-sent (invariant 1), so every waiting record keeps a message
that will wake a worker for someone, and the lease still turns every duplicate away (invariant 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from core.models import AdapterOperation, Evaluation, Job, utcnow
from core.repository import leases
from core.repository.leases import Leased

MODELS: tuple[Leased, ...] = (Job, Evaluation, AdapterOperation)
# The Postgres advisory lock around a claim ("fair"): concurrent workers claim one at a time, so the cap holds.
DISPATCH_LOCK_KEY = 0x66616972
# A pick can lose its record to another worker between the read and the claim; then pick again, a few times.
PICK_ROUNDS = 4


def waiting(model: Leased, now: datetime) -> Any:
    """Claimable: queued, or running under an expired lease; attempts left; no cancel asked."""
    m: Any = model
    return and_(
        m.cancel_requested.is_(False),
        m.attempt_count < m.max_attempts,
        or_(
            m.status == leases.status(model, "queued"),
            and_(m.status == leases.status(model, "running"), m.lease_expires_at < now),
        ),
    )


def live(model: Leased, now: datetime) -> Any:
    m: Any = model
    return and_(m.status == leases.status(model, "running"), m.lease_expires_at >= now)


def running_count(tenant_id: str, now: datetime) -> Any:
    """SQL: how many records of the tenant run under a live lease, every kind together."""
    counts = [
        select(func.count()).select_from(model).where(model.tenant_id == tenant_id, live(model, now)).scalar_subquery()
        for model in MODELS
    ]
    return counts[0] + counts[1] + counts[2]


def _aware(value: datetime) -> datetime:
    # SQLite hands timezone-aware columns back naive (in UTC).
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@dataclass
class TenantTurn:
    """Where a tenant with waiting work stands in the fair order."""

    tenant_id: str
    oldest_waiting: datetime
    running: int = 0
    last_served: datetime | None = None

    def key(self) -> tuple[int, datetime, datetime]:
        never = datetime.min.replace(tzinfo=UTC)
        return (self.running, self.last_served or never, self.oldest_waiting)


def tenant_turns(session: Session, now: datetime) -> list[TenantTurn]:
    """Every tenant with waiting work, in fair order (first: the next to be served)."""
    turns: dict[str, TenantTurn] = {}
    for model in MODELS:
        m: Any = model
        rows = session.execute(
            select(m.tenant_id, func.min(m.created_at)).where(waiting(model, now)).group_by(m.tenant_id)
        )
        for tenant_id, oldest in rows:
            oldest = _aware(oldest)
            turn = turns.setdefault(tenant_id, TenantTurn(tenant_id, oldest))
            turn.oldest_waiting = min(turn.oldest_waiting, oldest)
    if not turns:
        return []
    for model in MODELS:
        m = model
        rows = session.execute(
            select(m.tenant_id, func.count().filter(live(model, now)), func.max(m.started_at))
            .where(m.tenant_id.in_(turns))
            .group_by(m.tenant_id)
        )
        for tenant_id, running, served in rows:
            turn = turns[tenant_id]
            turn.running += int(running or 0)
            if served is not None and (turn.last_served is None or _aware(served) > turn.last_served):
                turn.last_served = _aware(served)
    return sorted(turns.values(), key=TenantTurn.key)


def oldest_waiting(session: Session, tenant_id: str, now: datetime) -> tuple[Leased, str] | None:
    """The tenant's longest-waiting record of any kind."""
    best: tuple[datetime, Leased, str] | None = None
    for model in MODELS:
        m: Any = model
        row = session.execute(
            select(m.id, m.created_at)
            .where(m.tenant_id == tenant_id, waiting(model, now))
            .order_by(m.created_at, m.id)
            .limit(1)
        ).first()
        if row is not None and (best is None or _aware(row[1]) < best[0]):
            best = (_aware(row[1]), model, row[0])
    return None if best is None else (best[1], best[2])


def next_fair(session: Session, *, cap: int, now: datetime) -> tuple[Leased, str] | None:
    """The record a free worker should claim now, or None when nothing waits (or every waiting tenant is capped)."""
    for turn in tenant_turns(session, now):
        if not cap or turn.running < cap:
            return oldest_waiting(session, turn.tenant_id, now)
    return None


def lock_dispatch(session: Session) -> None:
    """Postgres: one claim at a time until this transaction ends (SQLite: the claim's UPDATE holds the one write lock,
    and its cap condition is read inside it)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(DISPATCH_LOCK_KEY)))


def claim_fair(session: Session, *, owner: str, lease_seconds: int, cap: int) -> tuple[Leased, str] | None:
    """Claim the fairly next record (the woken one, or another of any tenant's); None: none claimed."""
    lock_dispatch(session)
    for _ in range(PICK_ROUNDS):
        now = utcnow()
        pick = next_fair(session, cap=cap, now=now)
        if pick is None:
            return None
        model, record_id = pick
        m: Any = model
        tenant_id = session.scalar(select(m.tenant_id).where(m.id == record_id))
        under_cap = running_count(str(tenant_id), now) < cap if cap else None
        if leases.claim(session, model, record_id, owner=owner, lease_seconds=lease_seconds, also=under_cap):
            return pick
    return None


def tenant_waiting_at_cap(session: Session, model: Leased, record_id: str, *, cap: int) -> tuple[Leased, str] | None:
    """After an attempt of this record ended: another record of its tenant waiting, if the tenant was at its cap.

    A worker that found every waiting tenant capped took a message and claimed nothing, so the waiting records may now
    be one message short; the supervisor sends one for the tenant whose slot just freed (the reconciler is the backstop).
    """
    if not cap:
        return None
    now = utcnow()
    m: Any = model
    tenant_id = session.scalar(select(m.tenant_id).where(m.id == record_id))
    if tenant_id is None or (session.scalar(select(running_count(tenant_id, now))) or 0) + 1 < cap:
        return None
    return oldest_waiting(session, tenant_id, now)
