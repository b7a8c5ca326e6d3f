"""SQL for jobs and their events, including the lease that keeps one live attempt per job."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.errors import redact_paths
from core.models import Dataset, Evaluation, Job, JobEvent, JobStatus
from core.repository import get_owned, leases, newest_first_page


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
    session: Session,
    tenant_id: str | None,
    *,
    limit: int,
    after: str | None,
    status: JobStatus | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Job], bool]:
    """A page of the tenant's jobs (None: every tenant's, for maintenance); with metadata, only jobs whose metadata
    holds each of those keys with that value."""
    query = select(Job)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    for key, value in (metadata or {}).items():
        query = query.where(Job.metadata_[key].as_string() == value)
    return newest_first_page(session, Job, query, limit=limit, after=after)


def jobs_by_adapter(session: Session, tenant_id: str, adapter_names: list[str]) -> dict[str, Job]:
    """The tenant's jobs that made these adapters, by adapter name."""
    if not adapter_names:
        return {}
    query = select(Job).where(Job.tenant_id == tenant_id, Job.adapter_name.in_(adapter_names))
    return {job.adapter_name: job for job in session.scalars(query) if job.adapter_name is not None}


def metrics_events(session: Session, job_id: str) -> list[JobEvent]:
    """The job's metrics events (training loss, validation loss), oldest first."""
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "metrics").order_by(JobEvent.id)
    return list(session.scalars(query))


def count_by_status(session: Session) -> dict[JobStatus, int]:
    """Jobs per status (every status present, zero when none)."""
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    counts = dict.fromkeys(JobStatus, 0)
    counts.update(dict(rows))
    return counts


# A paused job counts: it holds checkpoints and takes a worker again on resume.
ACTIVE = (JobStatus.queued, JobStatus.running, JobStatus.paused)
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


def record_progress(
    session: Session, job_id: str, *, owner: str, step: int, total_steps: int | None, loss: float | None
) -> bool:
    """The attempt's step and loss, written only while its lease is held."""
    values: dict[str, object] = {"step": step, "total_steps": total_steps}
    if loss is not None:
        values["last_loss"] = loss
    return leases.update_owned(session, Job, job_id, owner=owner, **values)


def add_event(session: Session, event: JobEvent) -> None:
    """Store a job event; its message, which the tenant reads, without server paths (core.errors.redact_paths)."""
    if event.message:
        event.message = redact_paths(event.message)
    session.add(event)


def list_events(session: Session, job_id: str, *, limit: int, after: int | None) -> tuple[list[JobEvent], bool]:
    """Events oldest first, continuing after event id `after`."""
    query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id).limit(limit + 1)
    if after is not None:
        query = query.where(JobEvent.id > after)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


def succeeded_without_evaluations(
    session: Session, *, finished_after: datetime, finished_before: datetime
) -> list[Job]:
    """Succeeded jobs in a time window that asked for a before/after evaluation on a dataset with a test split,
    and have no evaluation rows (the sweeper's input).

    New jobs get theirs in the transaction that marks them succeeded; this finds what predates that or was lost.
    Every condition is in SQL, so a round reads only real candidates. The rows stay locked until the caller commits.
    """
    has_evaluation = select(Evaluation.id).where(Evaluation.job_id == Job.id).exists()
    query = (
        select(Job)
        .join(Dataset, Dataset.id == Job.dataset_id)
        .where(
            Job.status == JobStatus.succeeded,
            Job.adapter_name.is_not(None),
            Job.finished_at > finished_after,
            Job.finished_at < finished_before,
            Job.evaluation["enabled"].as_boolean().is_(True),
            Dataset.test_rows > 0,
            ~has_evaluation,
        )
        # Every API process runs a sweeper: a job one of them is planning is skipped by the others (Postgres; SQLite
        # has one writer at a time, and a second planner's stale snapshot cannot write).
        .with_for_update(skip_locked=True, of=Job)
    )
    return list(session.scalars(query))


def list_events_newest_first(
    session: Session, job_id: str, *, limit: int, before: int | None
) -> tuple[list[JobEvent], bool]:
    """Events newest first (OpenAI's list_events order), continuing with those older than event id `before`."""
    query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(limit + 1)
    if before is not None:
        query = query.where(JobEvent.id < before)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit
