"""SQL for pausing and resuming a job: each move is one conditional UPDATE, so a pause, a resume, a cancel and the
worker's own writes can land in any order and leave one consistent state (docs/architecture.md, "Job states")."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from core.models import Job, JobEvent, JobStatus, utcnow
from core.repository import leases, rowcount


def request_pause(session: Session, job_id: str) -> None:
    """A queued job is paused at once; a running one is flagged, and its attempt pauses at its next step."""
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.paused, pause_requested=False, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running, Job.cancel_requested.is_(False))
        .values(pause_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.expire_all()


def resume(session: Session, job_id: str) -> bool:
    """A paused job queued again (True: the caller sends it); a pause not yet reached is called off instead."""
    now = utcnow()
    resumed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.paused)
        .values(status=JobStatus.queued, pause_requested=False, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running, Job.pause_requested.is_(True))
        .values(pause_requested=False, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    return rowcount(resumed) == 1


def settle_pause(session: Session, job_id: str, *, owner: str, attempt: int) -> bool:
    """The owner's attempt stopped at a checkpoint for a pause still asked: paused, the lease released. A pause is not a
    failure, so it gives the attempt back (max_attempts + 1): resumes never run a job out of attempts."""
    result = session.execute(
        update(Job)
        .where(leases.owned_running(Job, job_id, owner), Job.pause_requested.is_(True), Job.cancel_requested.is_(False))
        .values(
            status=JobStatus.paused,
            pause_requested=False,
            lease_owner=None,
            lease_expires_at=None,
            max_attempts=Job.max_attempts + 1,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        return False
    session.add(JobEvent(job_id=job_id, kind="status", attempt=attempt, message="job paused at its last checkpoint"))
    return True
