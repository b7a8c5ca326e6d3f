"""SQL for records a worker claims with a lease, as jobs are (evaluations, adapter operations): one live attempt each."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from core.models import LeasedWork, WorkStatus, utcnow

W = TypeVar("W", bound=LeasedWork)


def claim(session: Session, model: type[W], record_id: str, *, owner: str, lease_seconds: int) -> bool:
    """Take the lease if the record is queued, or running under an expired lease; False if someone holds it."""
    now = utcnow()
    m: Any = model
    result = session.execute(
        update(model)
        .where(
            m.id == record_id,
            m.attempt_count < m.max_attempts,
            or_(m.status == WorkStatus.queued, and_(m.status == WorkStatus.running, m.lease_expires_at < now)),
        )
        .values(
            status=WorkStatus.running,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempt_count=m.attempt_count + 1,
            started_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def owned_running(model: type[W], record_id: str, owner: str) -> Any:
    m: Any = model
    return and_(m.id == record_id, m.lease_owner == owner, m.status == WorkStatus.running)


def renew(session: Session, model: type[W], record_id: str, *, owner: str, lease_seconds: int) -> bool:
    """Extend the lease; False means it was lost (another attempt took over, or the record finished)."""
    result = session.execute(
        update(model)
        .where(owned_running(model, record_id, owner))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def update_owned(session: Session, model: type[W], record_id: str, *, owner: str, **values: Any) -> bool:
    """Write values to a running record this owner holds; False if the lease is not ours."""
    result = session.execute(
        update(model)
        .where(owned_running(model, record_id, owner))
        .values(updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def finish(
    session: Session,
    model: type[W],
    record_id: str,
    *,
    owner: str,
    status: WorkStatus,
    error: tuple[str, str, str | None] | None = None,
    **values: Any,
) -> bool:
    """Move an owned running record to a terminal state and release the lease."""
    if error is not None:
        values["error_code"], values["error_message"], values["error_param"] = error
    return update_owned(
        session, model, record_id, owner=owner, status=status, finished_at=utcnow(), lease_owner=None,
        lease_expires_at=None, **values,
    )


def release_for_retry(session: Session, model: type[W], record_id: str, *, owner: str, reason: str) -> bool:
    """A transient failure: back to queued so another attempt can claim it."""
    return update_owned(
        session, model, record_id, owner=owner, status=WorkStatus.queued, lease_owner=None, lease_expires_at=None,
        error_code="worker_lost", error_message=reason,
    )


def stale(session: Session, model: type[W], *, queued_before: datetime, now: datetime) -> list[str]:
    """Records that need another dispatch: queued too long, or running under an expired lease with attempts left."""
    m: Any = model
    query = select(m.id).where(
        or_(
            and_(m.status == WorkStatus.queued, m.updated_at < queued_before),
            and_(m.status == WorkStatus.running, m.lease_expires_at < now, m.attempt_count < m.max_attempts),
        )
    )
    return list(session.scalars(query))


def fail_abandoned(session: Session, model: type[W], *, now: datetime) -> list[str]:
    """Running records whose lease expired with no attempts left: failed, with the reason."""
    m: Any = model
    ids = list(
        session.scalars(
            select(m.id).where(
                m.status == WorkStatus.running, m.lease_expires_at < now, m.attempt_count >= m.max_attempts
            )
        )
    )
    if ids:
        session.execute(
            update(model)
            .where(m.id.in_(ids))
            .values(
                status=WorkStatus.failed, lease_owner=None, lease_expires_at=None, finished_at=now, updated_at=now,
                error_code="worker_lost", error_message="the worker running this stopped answering and no attempts are left",
            )
            .execution_options(synchronize_session=False)
        )
    return ids


def touch(session: Session, model: type[W], record_id: str) -> None:
    """Mark a queued record as just dispatched, so the reconciler waits before sending it again."""
    m: Any = model
    session.execute(
        update(model).where(m.id == record_id).values(updated_at=utcnow()).execution_options(synchronize_session=False)
    )
