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
from collections.abc import Callable

from core.db import session_scope
from core.models import AdapterOperation, Evaluation, Job, JobEvent, JobStatus, LeasedWork, WorkStatus
from core.queue import ADAPTER_OPERATION_TASK, EVALUATE_TASK, TRAIN_TASK, send_adapter_operation, send_evaluate
from core.repository import evaluations as evaluations_repo
from core.repository import jobs as jobs_repo
from core.repository import leases
from core.repository.datasets import get_dataset
from core.settings import Settings, get_settings
from worker.app import app
from worker.process import die_with_parent
from worker.training import EXIT_TRANSIENT, training_command

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
    schedule_job_evaluations(settings, job_id)


def schedule_job_evaluations(settings: Settings, job_id: str) -> list[str]:
    """After a job succeeds: queue its base and adapter evaluations on the test split (once), if it asked for them."""
    with session_scope(settings.database_url) as s:
        job = jobs_repo.get_job(s, job_id)
        if job is None or job.status != JobStatus.succeeded or not job.adapter_name or not job.evaluation:
            return []
        options = dict(job.evaluation)
        if not options.pop("enabled", True) or evaluations_repo.evaluations_for_job(s, job_id):
            return []
        dataset = get_dataset(s, job.dataset_id)
        if dataset is None or dataset.test_rows == 0:
            jobs_repo.add_event(s, JobEvent(job_id=job_id, kind="status", message="no test split: before/after evaluation skipped"))
            return []
        scales = options.pop("scales", None) or [1.0]
        rows = [
            Evaluation(
                tenant_id=job.tenant_id, dataset_id=job.dataset_id, split="test", base_model=job.base_model, adapter_name=adapter,
                job_id=job_id, role=role, scales=row_scales, max_attempts=settings.max_attempts, **options,
            )
            for role, adapter, row_scales in (("base", None, None), ("adapter", job.adapter_name, scales))
        ]
        ids = [evaluations_repo.add_evaluation(s, row).id for row in rows]
        jobs_repo.add_event(s, JobEvent(job_id=job_id, kind="status", message=f"evaluation queued: base {ids[0]}, adapter {ids[1]}"))
    for evaluation_id in ids:
        try:
            send_evaluate(settings, evaluation_id)
        except Exception:  # noqa: BLE001 - the rows are committed; the reconciler re-sends them
            log.warning("could not send evaluation %s; the reconciler will resend it", evaluation_id, exc_info=True)
    return ids


@app.task(name=EVALUATE_TASK)
def evaluate(evaluation_id: str) -> None:
    """Run one attempt of an evaluation in a child process, unless it is done or held by a live lease."""
    run_leased_child(get_settings(), Evaluation, evaluation_id, "evaluation")


@app.task(name=ADAPTER_OPERATION_TASK)
def adapter_operation(operation_id: str) -> None:
    """Derive a scaled adapter or merge one into a full model, in a child process."""
    run_leased_child(get_settings(), AdapterOperation, operation_id, "adapter_operation")


def run_leased_child(settings: Settings, model: type[LeasedWork], record_id: str, kind: str) -> None:
    """Claim the record, run `python -m worker.evaluation KIND ID OWNER`, renew the lease while it lives."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with session_scope(settings.database_url) as s:
        if not leases.claim(s, model, record_id, owner=owner, lease_seconds=settings.lease_seconds):
            log.info("%s %s: not claimable (finished or held elsewhere); skipping", kind, record_id)
            return
    child = subprocess.Popen(
        [sys.executable, "-m", "worker.evaluation", kind, record_id, owner],
        start_new_session=True,
        preexec_fn=die_with_parent,
    )

    def renew() -> bool:
        with session_scope(settings.database_url) as s:
            return leases.renew(s, model, record_id, owner=owner, lease_seconds=settings.lease_seconds)

    code = wait_renewing_lease(child, settings, renew, model, record_id, label=f"{kind} {record_id}")
    if code is None or code == 0:
        return
    reason = f"{kind} process exited with {'signal ' + str(-code) if code < 0 else 'code ' + str(code)}"
    with session_scope(settings.database_url) as s:
        row = s.get(model, record_id)
        if row is None or row.lease_owner != owner:
            return
        retry = (code == EXIT_TRANSIENT or code < 0) and row.attempt_count < row.max_attempts
        if retry:
            leases.release_for_retry(s, model, record_id, owner=owner, reason=f"{reason}; retrying")
        else:
            leases.finish(s, model, record_id, owner=owner, status=WorkStatus.failed, error=("worker_lost", reason, None))
    if retry:
        (send_evaluate if model is Evaluation else send_adapter_operation)(settings, record_id)


def supervise_attempt(settings: Settings, job_id: str, owner: str, attempt: int) -> None:
    """Run the training child, renew the lease while it lives, and enforce cancellation and lease loss."""
    child = subprocess.Popen(training_command(settings, job_id, owner), start_new_session=True, preexec_fn=die_with_parent)
    cancel_seen_at: float | None = None

    def renew() -> bool:
        nonlocal cancel_seen_at
        with session_scope(settings.database_url) as s:
            still_owner = jobs_repo.renew_lease(s, job_id, owner=owner, lease_seconds=settings.lease_seconds)
            cancel = jobs_repo.is_cancel_requested(s, job_id)
        if still_owner and cancel:
            cancel_seen_at = cancel_seen_at or time.monotonic()
            if time.monotonic() - cancel_seen_at > settings.cancel_grace_seconds:
                # Cooperative cancel did not finish in time (DESIGN invariant 3): hard-kill the child.
                _kill(child)
                with session_scope(settings.database_url) as s:
                    jobs_repo.finish_job(s, job_id, owner=owner, status=JobStatus.cancelled)
                    jobs_repo.add_event(s, JobEvent(job_id=job_id, kind="status", attempt=attempt, message="job cancelled (child killed after the grace period)"))
                return False
        return still_owner

    code = wait_renewing_lease(child, settings, renew, Job, job_id, label=f"job {job_id}")
    if code is None or code == 0:
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


def wait_renewing_lease(
    child: subprocess.Popen[bytes],
    settings: Settings,
    renew: Callable[[], bool],
    model: type[Job] | type[LeasedWork],
    record_id: str,
    *,
    label: str,
) -> int | None:
    """The child's exit code, renewing the lease every heartbeat; None once `renew` says the lease is gone.

    A lease goes away in two ways: the child finished the record (and released it) and is still exiting,
    which gets cancel_grace_seconds to exit on its own; or another attempt took over, which stops this
    child after one more heartbeat.
    """
    while True:
        try:
            return child.wait(timeout=settings.heartbeat_seconds)
        except subprocess.TimeoutExpired:
            pass
        if renew():
            continue
        with session_scope(settings.database_url) as s:
            row = s.get(model, record_id)
            done = row is None or row.status.is_terminal
        try:
            child.wait(timeout=settings.cancel_grace_seconds if done else settings.heartbeat_seconds)
        except subprocess.TimeoutExpired:
            if done:
                log.info("%s: finished, but its process did not exit; stopping it", label)
            else:
                log.warning("%s: lease lost; stopping this attempt", label)
            _kill(child)
        return None


def _kill(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
