"""SQL for every record a worker claims with a lease: jobs, evaluations and adapter operations.

One live attempt per record (docs/architecture.md, invariants 1 and 2): a worker claims the lease, renews it
while its child runs, and every write of the attempt is conditional on still holding it. Cancellation,
retry, lease loss and abandonment are the same for every kind of work, so they live here once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from core.errors import redact_paths
from core.models import AdapterOperation, Evaluation, Job, JobEvent, utcnow
from core.repository import rowcount

W = TypeVar("W", Job, Evaluation, AdapterOperation)
Leased = type[Job] | type[Evaluation] | type[AdapterOperation]

# Re-sends of one record back off as requeue_after x 2^n, n capped here: at most ~7 sends in the first
# 64 x requeue_after of a wait, whatever the number of API replicas (each send is claimed by one UPDATE).
MAX_BACKOFF_EXPONENT = 6
# States in which a record waits with no worker on it (only jobs pause).
IDLE = ("queued", "paused")


def get(session: Session, model: Leased, record_id: str) -> Job | Evaluation | AdapterOperation | None:
    """The record by id (Session.get types a union of models as their common base)."""
    return cast(Job | Evaluation | AdapterOperation | None, session.get(model, record_id))


def status(model: Leased, name: str) -> Any:
    """The model's own status member called `name` (jobs and the other work share the names)."""
    status_type: Any = model.__table__.c.status.type
    return status_type.enum_class[name]


def note(
    session: Session, model: Leased, record_id: str, message: str, *, attempt: int | None = None, level: str = "info"
) -> None:
    """A status line in the record's history: jobs keep an event log; the other kinds show their error columns."""
    if model is Job:
        session.add(
            JobEvent(job_id=record_id, kind="status", level=level, attempt=attempt, message=redact_paths(message))
        )


def _update(model: Leased, *where: Any) -> Any:
    return update(model).where(*where).execution_options(synchronize_session=False)


def claim(session: Session, model: Leased, record_id: str, *, owner: str, lease_seconds: int, also: Any = None) -> bool:
    """Take the lease if the record is queued, or running under an expired lease; False if it is held, done,
    cancel-requested or out of attempts (or `also`, a further SQL condition, fails: the tenant's cap). A claim ends
    the record's dispatch episode (its message arrived)."""
    now = utcnow()
    m: Any = model
    result = session.execute(
        _update(
            model,
            *(() if also is None else (also,)),
            m.id == record_id,
            m.cancel_requested.is_(False),
            m.attempt_count < m.max_attempts,
            or_(
                m.status == status(model, "queued"),
                and_(m.status == status(model, "running"), m.lease_expires_at < now),
            ),
        ).values(
            status=status(model, "running"),
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempt_count=m.attempt_count + 1,
            dispatch_count=0,
            started_at=now,
            updated_at=now,
        )
    )
    return rowcount(result) == 1


def owned_running(model: Leased, record_id: str, owner: str) -> Any:
    m: Any = model
    return and_(m.id == record_id, m.lease_owner == owner, m.status == status(model, "running"))


def renew(session: Session, model: Leased, record_id: str, *, owner: str, lease_seconds: int) -> tuple[bool, bool]:
    """Extend the lease: (still held, cancel requested). Not held: another attempt took over, or it finished."""
    m: Any = model
    result = session.execute(
        _update(model, owned_running(model, record_id, owner)).values(
            lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)
        )
    )
    cancel = bool(session.scalar(select(m.cancel_requested).where(m.id == record_id)))
    return rowcount(result) == 1, cancel


def lock_owned(session: Session, model: Leased, record_id: str, *, owner: str) -> bool:
    """Hold the record's row lock until this transaction ends, if the lease is ours (False otherwise).

    A write (not SELECT ... FOR UPDATE) so that SQLite takes its write lock too. Whatever is done before the
    commit (publishing files, registering an adapter) is done by the lease holder alone.
    """
    result = session.execute(_update(model, owned_running(model, record_id, owner)).values(updated_at=utcnow()))
    return rowcount(result) == 1


def update_owned(session: Session, model: Leased, record_id: str, *, owner: str, **values: Any) -> bool:
    """Write values to a running record this owner holds; False if the lease is not ours."""
    result = session.execute(
        _update(model, owned_running(model, record_id, owner)).values(updated_at=utcnow(), **values)
    )
    return rowcount(result) == 1


def finish(
    session: Session,
    model: Leased,
    record_id: str,
    *,
    owner: str,
    status_name: str,
    error: tuple[str, str, str | None] | None = None,
    **values: Any,
) -> bool:
    """Move an owned running record to a terminal state and release the lease; the error's message, which its tenant
    reads, without server paths (core.errors.redact_paths)."""
    if error is not None:
        values["error_code"], values["error_message"], values["error_param"] = error
        values["error_message"] = redact_paths(values["error_message"])
    return update_owned(
        session,
        model,
        record_id,
        owner=owner,
        status=status(model, status_name),
        finished_at=utcnow(),
        lease_owner=None,
        lease_expires_at=None,
        **values,
    )


def release_for_retry(session: Session, model: Leased, record_id: str, *, owner: str, reason: str) -> str | None:
    """A transient failure: back to queued for another attempt, or `cancelled` if a cancel was asked meanwhile.

    The new state's name, or None if the lease was not ours. One conditional UPDATE each, so a cancel that
    lands between the supervisor's read and this call cannot leave a queued record with its flag set.
    """
    m: Any = model
    now = utcnow()
    requeued = session.execute(
        _update(model, owned_running(model, record_id, owner), m.cancel_requested.is_(False)).values(
            status=status(model, "queued"),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
            error_code="worker_lost",
            error_message=redact_paths(reason),
            error_param=None,
        )
    )
    if rowcount(requeued) == 1:
        return "queued"
    if finish(session, model, record_id, owner=owner, status_name="cancelled"):
        return "cancelled"
    return None


def request_cancel(session: Session, model: Leased, record_id: str) -> None:
    """Flag the record; a queued one is cancelled at once, a running one by its worker (or the reconciler,
    once its lease expired)."""
    m: Any = model
    now = utcnow()
    # Nobody runs a queued record, nor a paused job: cancelled at once.
    idle = [member for name, member in m.__table__.c.status.type.enum_class.__members__.items() if name in IDLE]
    session.execute(
        _update(model, m.id == record_id, m.status.in_(idle)).values(
            status=status(model, "cancelled"), cancel_requested=True, finished_at=now, updated_at=now
        )
    )
    session.execute(
        _update(model, m.id == record_id, m.status == status(model, "running")).values(
            cancel_requested=True, updated_at=now
        )
    )
    session.expire_all()


def settle_cancelled(session: Session, model: Leased, *, now: datetime) -> list[str]:
    """Cancel-requested records nobody runs any more (queued, or running under an expired lease): cancelled."""
    m: Any = model
    where = and_(
        m.cancel_requested.is_(True),
        or_(m.status == status(model, "queued"), and_(m.status == status(model, "running"), m.lease_expires_at < now)),
    )
    ids = list(session.scalars(select(m.id).where(where)))
    if ids:
        session.execute(
            _update(model, m.id.in_(ids), where).values(
                status=status(model, "cancelled"),
                lease_owner=None,
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
            )
        )
    return ids


def fail_abandoned(session: Session, model: Leased, *, now: datetime) -> list[str]:
    """Running records whose lease expired with no attempts left: failed, with the reason."""
    m: Any = model
    where = and_(
        m.status == status(model, "running"),
        m.lease_expires_at < now,
        m.attempt_count >= m.max_attempts,
        m.cancel_requested.is_(False),
    )
    ids = list(session.scalars(select(m.id).where(where)))
    if ids:
        session.execute(
            _update(model, m.id.in_(ids), where).values(
                status=status(model, "failed"),
                lease_owner=None,
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
                error_code="worker_lost",
                error_message="the worker running this stopped answering and no attempts are left",
            )
        )
    return ids


def mark_dispatched(session: Session, model: Leased, record_id: str) -> None:
    """Record a send that follows this transaction's commit (the first send of a new or retried record)."""
    m: Any = model
    session.execute(
        _update(model, m.id == record_id).values(dispatch_count=m.dispatch_count + 1, dispatched_at=utcnow())
    )


def due_for_redispatch(model: Leased, *, now: datetime, requeue_after_seconds: int) -> Any:
    """Queued too long, or running under an expired lease with attempts left, and the last send is older than
    requeue_after x 2^(sends - 1): the backoff that keeps duplicate messages bounded while workers are busy."""
    m: Any = model
    waiting = or_(
        m.status == status(model, "queued"),
        and_(m.status == status(model, "running"), m.lease_expires_at < now, m.attempt_count < m.max_attempts),
    )
    # Postgres and SQLite both lack a portable 2^n on intervals, so compare per backoff step.
    backoff = or_(
        m.dispatched_at.is_(None),
        *(
            and_(
                m.dispatch_count == n if n < MAX_BACKOFF_EXPONENT + 1 else m.dispatch_count >= n,
                m.dispatched_at < now - timedelta(seconds=requeue_after_seconds * 2 ** max(n - 1, 0)),
            )
            for n in range(MAX_BACKOFF_EXPONENT + 2)
        ),
    )
    return and_(m.cancel_requested.is_(False), waiting, backoff)


def claim_redispatch(session: Session, model: Leased, *, now: datetime, requeue_after_seconds: int) -> list[str]:
    """The records due for another send, each marked as sent by one conditional UPDATE (so concurrent
    reconcilers, one per API replica, never both send the same record in the same round)."""
    m: Any = model
    where = due_for_redispatch(model, now=now, requeue_after_seconds=requeue_after_seconds)
    claimed = []
    for record_id in session.scalars(select(m.id).where(where)):
        result = session.execute(
            _update(model, m.id == record_id, where).values(dispatch_count=m.dispatch_count + 1, dispatched_at=now)
        )
        if rowcount(result) == 1:
            claimed.append(record_id)
    return claimed
