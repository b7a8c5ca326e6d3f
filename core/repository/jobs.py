"""SQL for jobs and their events, including the lease that keeps one live attempt per job."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from core.models import Job, JobEvent, JobStatus, utcnow
from core.repository import get_owned, newest_first_page


def add_job(session: Session, job: Job) -> Job:
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: str) -> Job | None:
    """Any tenant's job: for workers and the reconciler."""
    return session.get(Job, job_id)


def get_owned_job(session: Session, tenant_id: str, job_id: str) -> Job | None:
    return get_owned(session, Job, tenant_id, job_id)


def list_jobs(
    session: Session, tenant_id: str | None, *, limit: int, after: str | None, status: JobStatus | None = None
) -> tuple[list[Job], bool]:
    """A page of the tenant's jobs (None: every tenant's, for maintenance)."""
    query = select(Job)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    return newest_first_page(session, Job, query, limit=limit, after=after)


def count_by_status(session: Session) -> dict[JobStatus, int]:
    """Jobs per status (every status present, zero when none)."""
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    counts = dict.fromkeys(JobStatus, 0)
    counts.update({status: n for status, n in rows})
    return counts


ACTIVE = (JobStatus.validating_files, JobStatus.queued, JobStatus.running)
# The Postgres advisory lock around job admission: any constant, the same in every API process ("tune").
ADMISSION_LOCK_KEY = 0x74756E65


def count_active(session: Session, tenant_id: str) -> int:
    """The tenant's jobs that hold or wait for a worker: validating files, queued or running."""
    query = select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))
    return session.scalar(query) or 0


def lock_admission(session: Session) -> None:
    """Serialize job admission until this transaction ends.

    Postgres: a transaction-scoped advisory lock. SQLite: nothing to do, the caller has already written
    in this transaction and SQLite lets one writer at a time hold the database until it commits.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(ADMISSION_LOCK_KEY)))


def claim_job(session: Session, job_id: str, *, owner: str, lease_seconds: int) -> bool:
    """Take the job's lease if it is queued, or running under an expired lease; False if someone holds it."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.cancel_requested.is_(False),
            Job.attempt_count < Job.max_attempts,
            or_(
                Job.status == JobStatus.queued,
                and_(Job.status == JobStatus.running, Job.lease_expires_at < now),
            ),
        )
        .values(
            status=JobStatus.running,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempt_count=Job.attempt_count + 1,
            started_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def renew_lease(session: Session, job_id: str, *, owner: str, lease_seconds: int) -> bool:
    """Extend the lease; False means it was lost (another attempt took over, or the job ended)."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.running)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def _owned_running(job_id: str, owner: str):  # type: ignore[no-untyped-def]
    return and_(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.running)


def record_progress(
    session: Session, job_id: str, *, owner: str, step: int, total_steps: int | None, loss: float | None
) -> bool:
    values: dict[str, object] = {"step": step, "total_steps": total_steps, "updated_at": utcnow()}
    if loss is not None:
        values["last_loss"] = loss
    result = session.execute(
        update(Job).where(_owned_running(job_id, owner)).values(**values).execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def finish_job(
    session: Session,
    job_id: str,
    *,
    owner: str,
    status: JobStatus,
    adapter_name: str | None = None,
    error: tuple[str, str, str | None] | None = None,
    train_tokens: int | None = None,
) -> bool:
    """Move an owned running job to a terminal state and release the lease."""
    values: dict[str, object] = {
        "status": status,
        "finished_at": utcnow(),
        "updated_at": utcnow(),
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if adapter_name is not None:
        values["adapter_name"] = adapter_name
    if train_tokens is not None:
        values["train_tokens"] = train_tokens
    if error is not None:
        values["error_code"], values["error_message"], values["error_param"] = error
    result = session.execute(
        update(Job).where(_owned_running(job_id, owner)).values(**values).execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def release_for_retry(session: Session, job_id: str, *, owner: str, error: tuple[str, str, str | None]) -> bool:
    """A transient failure: back to queued (the lease dropped) so another attempt can claim it."""
    code, message, param = error
    result = session.execute(
        update(Job)
        .where(_owned_running(job_id, owner))
        .values(
            status=JobStatus.queued,
            lease_owner=None,
            lease_expires_at=None,
            error_code=code,
            error_message=message,
            error_param=param,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def request_cancel(session: Session, job_id: str) -> Job | None:
    """Flag the job; a queued one is cancelled at once, a running one by its training callback."""
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([JobStatus.queued, JobStatus.validating_files]))
        .values(status=JobStatus.cancelled, cancel_requested=True, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running)
        .values(cancel_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    return session.get(Job, job_id)


def is_cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def stale_jobs(session: Session, *, queued_before: datetime, now: datetime) -> list[str]:
    """Jobs that need another dispatch: queued too long, or running under an expired lease."""
    query = select(Job.id).where(
        or_(
            and_(Job.status == JobStatus.queued, Job.updated_at < queued_before),
            and_(Job.status == JobStatus.running, Job.lease_expires_at < now),
        )
    )
    return list(session.scalars(query))


def add_event(session: Session, event: JobEvent) -> None:
    session.add(event)


def list_events(session: Session, job_id: str, *, limit: int, after: int | None) -> tuple[list[JobEvent], bool]:
    """Events oldest first, continuing after event id `after`."""
    query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id).limit(limit + 1)
    if after is not None:
        query = query.where(JobEvent.id > after)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


def loss_history(session: Session, job_id: str) -> list[JobEvent]:
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.loss.is_not(None)).order_by(JobEvent.id)
    return list(session.scalars(query))


def touch_job(session: Session, job_id: str) -> None:
    """Mark a queued job as just dispatched, so the reconciler waits before sending it again."""
    session.execute(
        update(Job).where(Job.id == job_id).values(updated_at=utcnow()).execution_options(synchronize_session=False)
    )


def fail_abandoned(session: Session, *, now: datetime) -> list[str]:
    """Running jobs whose lease expired with no attempts left: failed, with the reason."""
    ids = list(
        session.scalars(
            select(Job.id).where(
                Job.status == JobStatus.running, Job.lease_expires_at < now, Job.attempt_count >= Job.max_attempts
            )
        )
    )
    for job_id in ids:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=JobStatus.failed,
                lease_owner=None,
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
                error_code="worker_lost",
                error_message="the worker running this job stopped answering and no attempts are left",
            )
            .execution_options(synchronize_session=False)
        )
        add_event(session, JobEvent(job_id=job_id, kind="status", level="error", message="job failed: worker lost"))
    return ids
