"""Celery tasks. A task gets only a job id, claims the job's lease, and supervises a training child."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

from core.db import session_scope
from core.models import JobEvent, JobStatus
from core.queue import TRAIN_TASK
from core.repository import jobs as jobs_repo
from core.settings import Settings, get_settings
from worker.app import app
from worker.training import EXIT_TRANSIENT

log = logging.getLogger("tuneserve.worker")


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    """Run one attempt of the job, unless its row says it is done, cancelled or held by a live lease."""
    settings = get_settings()
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with session_scope(settings.database_url) as s:
        if not jobs_repo.claim_job(s, job_id, owner=owner, lease_seconds=settings.lease_seconds):
            log.info("job %s: not claimable (finished, cancelled or held elsewhere); skipping", job_id)
            return
        job = jobs_repo.get_job(s, job_id)
        assert job is not None
        attempt = job.attempt_count
        jobs_repo.add_event(s, JobEvent(job_id=job_id, kind="status", attempt=attempt, message=f"attempt {attempt} started"))
    supervise_attempt(settings, job_id, owner, attempt)


def supervise_attempt(settings: Settings, job_id: str, owner: str, attempt: int) -> None:
    """Run the training child, renew the lease while it lives, and enforce cancellation and lease loss."""
    child = subprocess.Popen([sys.executable, "-m", "worker.training", job_id, owner], start_new_session=True)
    cancel_seen_at: float | None = None
    while True:
        try:
            code = child.wait(timeout=settings.heartbeat_seconds)
            break
        except subprocess.TimeoutExpired:
            pass
        with session_scope(settings.database_url) as s:
            still_owner = jobs_repo.renew_lease(s, job_id, owner=owner, lease_seconds=settings.lease_seconds)
            cancel = jobs_repo.is_cancel_requested(s, job_id)
        if not still_owner:
            # Either the child just finished the job (and released the lease) or another attempt took over.
            try:
                child.wait(timeout=settings.heartbeat_seconds)
            except subprocess.TimeoutExpired:
                log.warning("job %s: lease lost; stopping this attempt", job_id)
                _kill(child)
            return
        if cancel:
            cancel_seen_at = cancel_seen_at or time.monotonic()
            if time.monotonic() - cancel_seen_at > settings.cancel_grace_seconds:
                # Cooperative cancel did not finish in time (DESIGN invariant 3): hard-kill the child.
                _kill(child)
                with session_scope(settings.database_url) as s:
                    jobs_repo.finish_job(s, job_id, owner=owner, status=JobStatus.cancelled)
                    jobs_repo.add_event(s, JobEvent(job_id=job_id, kind="status", attempt=attempt, message="job cancelled (child killed after the grace period)"))
                return
    if code == 0:
        return
    transient = code == EXIT_TRANSIENT or code < 0
    reason = f"training process exited with {'signal ' + str(-code) if code < 0 else 'code ' + str(code)}"
    with session_scope(settings.database_url) as s:
        job = jobs_repo.get_job(s, job_id)
        if job is None or job.lease_owner != owner:
            return
        if transient and job.attempt_count < job.max_attempts and not job.cancel_requested:
            jobs_repo.release_for_retry(s, job_id, owner=owner, error=("worker_lost", reason, None))
            jobs_repo.add_event(s, JobEvent(job_id=job_id, kind="status", level="warning", attempt=attempt, message=f"{reason}; retrying"))
            retry = True
        else:
            status = JobStatus.cancelled if job.cancel_requested else JobStatus.failed
            jobs_repo.finish_job(s, job_id, owner=owner, status=status, error=("worker_lost", f"{reason}; no attempts left", None))
            jobs_repo.add_event(s, JobEvent(job_id=job_id, kind="status", level="error", attempt=attempt, message=f"job {status.value}: {reason}"))
            retry = False
    if retry:
        from core.queue import send_train

        send_train(settings, job_id)


def _kill(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
