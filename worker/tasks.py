"""Celery tasks. A task gets only a record id, claims its lease, and supervises the child that does the work.

Jobs, evaluations and adapter operations run through the same supervisor (`run_leased`): claim, start the child,
renew the lease every heartbeat, enforce cancellation, lease loss and the wall-clock limit, and settle the
record's state when the child stops (docs/architecture.md, invariants 1-5).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from celery.signals import worker_init, worker_shutdown
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from core.db import session_scope
from core.models import AdapterOperation, Evaluation, Job, WorkStatus
from core.processes import die_with_parent
from core.queue import (
    ADAPTER_OPERATION_TASK,
    EVALUATE_TASK,
    TRAIN_TASK,
    commit_and_send,
    send_committed,
)
from core.repository import dispatch, leases
from core.repository.leases import Leased
from core.settings import Settings, get_settings
from core.storage import Store
from worker import forkserver
from worker.app import app
from worker.forkserver import WARM_MODULES, ForkServerGone, WarmChild
from worker.training import EXIT_TRANSIENT, training_command

log = logging.getLogger("tuneserve.worker")


@dataclass(frozen=True)
class WorkKind:
    """How the supervisor runs one kind of leased work."""

    model: Leased
    label: str
    command: Callable[[Settings, str, str], list[str]]


def _evaluation_child(kind: str) -> Callable[[Settings, str, str], list[str]]:
    return lambda _settings, record_id, owner: [sys.executable, "-m", "worker.evaluation", kind, record_id, owner]


KINDS: dict[Leased, WorkKind] = {
    Job: WorkKind(Job, "job", training_command),
    Evaluation: WorkKind(Evaluation, "evaluation", _evaluation_child("evaluation")),
    AdapterOperation: WorkKind(AdapterOperation, "adapter_operation", _evaluation_child("adapter_operation")),
}


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    """Run one attempt of the job, unless its row says it is done, cancelled or held by a live lease."""
    run_leased(get_settings(), KINDS[Job], job_id)


@app.task(name=EVALUATE_TASK)
def evaluate(evaluation_id: str) -> None:
    """Run one attempt of an evaluation in a child process, unless it is done or held by a live lease."""
    run_leased(get_settings(), KINDS[Evaluation], evaluation_id)


@app.task(name=ADAPTER_OPERATION_TASK)
def adapter_operation(operation_id: str) -> None:
    """Derive a scaled adapter, merge one into a full model, or run an import's canary, in a child process."""
    run_leased(get_settings(), KINDS[AdapterOperation], operation_id)


def time_limit(settings: Settings, row: Job | Evaluation | AdapterOperation) -> int:
    """The attempt's wall-clock limit: the operator's, or a job's own lower one."""
    own = (row.hyperparameters or {}).get("time_limit_seconds") if isinstance(row, Job) else None
    return min(own or settings.max_runtime_seconds, settings.max_runtime_seconds)


def run_leased(settings: Settings, kind: WorkKind, record_id: str) -> None:
    """Claim the record, run its child under the lease, settle the outcome. The child never outlives this call."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    label = f"{kind.label} {record_id}"
    warm = settings.warm_children and forkserver.server().wait_ready()
    try:
        with session_scope(settings.database_url) as s:
            # The message is a wake-up: claim the fairly next record, which is the named one unless another tenant's
            # turn comes first (core.repository.dispatch).
            picked = dispatch.claim_fair(
                s,
                owner=owner,
                lease_seconds=settings.lease_seconds,
                cap=settings.tenant_max_running_work,
            )
            if picked is None:
                log.info("%s: not claimable (finished, cancelled or held elsewhere), nothing else due; skipping", label)
                return
            if picked[1] != record_id:
                kind, record_id = KINDS[picked[0]], picked[1]
                log.info("%s: woken for it, %s %s is fairly next; running that", label, kind.label, record_id)
                label = f"{kind.label} {record_id}"
            row = leases.get(s, kind.model, record_id)
            assert row is not None
            attempt = row.attempt_count
            limit = time_limit(settings, row)
            leases.note(s, kind.model, record_id, f"attempt {attempt} started", attempt=attempt)
    except SQLAlchemyError:
        # Nothing was claimed (the transaction rolled back): the reconciler sends the record again.
        log.warning("%s: database unreachable, not claimed; the reconciler will send it again", label, exc_info=True)
        return
    child = start_child(kind.command(settings, record_id, owner), warm=warm, label=label)
    try:
        outcome = watch(child, settings, kind.model, record_id, owner, label=label, limit_seconds=limit)
    finally:
        # Whatever stops this supervisor (a database error included), the child and its group stop with it;
        # a supervisor killed outright takes its child along through PR_SET_PDEATHSIG.
        _kill(child)
    settle(settings, kind, record_id, owner, attempt, outcome, limit_seconds=limit)
    wake_capped_tenant(settings, kind.model, record_id)


def wake_capped_tenant(settings: Settings, model: Leased, record_id: str) -> None:
    """The attempt's tenant may have been at its running cap, and workers may have taken its waiting records' messages
    and claimed nothing: send one for the tenant's next waiting record now that a slot is free."""
    try:
        with session_scope(settings.database_url) as s:
            pick = dispatch.tenant_waiting_at_cap(s, model, record_id, cap=settings.tenant_max_running_work)
            if pick is not None:
                commit_and_send(s, settings, pick[0], pick[1])
    except SQLAlchemyError:
        log.warning("%s: could not wake its tenant's next record; the reconciler will", record_id, exc_info=True)


Child = subprocess.Popen[bytes] | WarmChild


def start_child(command: list[str], *, warm: bool, label: str) -> Child:
    """The attempt's child process: forked warm from this worker's fork server when the command is a plain
    `python -m worker.<child>` (DDP's torchrun is not), else a fresh interpreter. Either way it leads its own process
    group and dies with this worker."""
    if warm and command[:2] == [sys.executable, "-m"] and command[2] in WARM_MODULES:
        try:
            return forkserver.server().spawn(command[2], command[3:], env=dict(os.environ), cwd=os.getcwd())
        except (OSError, TimeoutError, ForkServerGone):
            log.warning("%s: the fork server did not answer; starting a cold child", label, exc_info=True)
    return subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent)


# What `watch` saw: the child's exit code, or why the supervisor stopped the child.
LEASE_LOST = "lease_lost"
CANCELLED = "cancelled"
TIMED_OUT = "time_limit"
HEARTBEAT_FAILED = "heartbeat_failed"
Outcome = int | str


def watch(
    child: Child,
    settings: Settings,
    model: Leased,
    record_id: str,
    owner: str,
    *,
    label: str,
    limit_seconds: float,
) -> Outcome:
    """Wait for the child, renewing the lease every heartbeat; stop it on cancel, lease loss or the time limit.

    A lease goes away in two ways: the child finished the record (and released it) and is still exiting, which
    gets cancel_grace_seconds to exit on its own; or another attempt took over, which stops this child after one
    more heartbeat. When the database cannot be reached, the child keeps running only while the lease surely
    still holds: it is stopped before the lease could expire and another attempt claim the record.
    """
    started = last_renewed = time.monotonic()
    renew_deadline = max(settings.lease_seconds - 2 * settings.heartbeat_seconds, settings.heartbeat_seconds)
    cancel_seen_at: float | None = None
    while True:
        try:
            return child.wait(timeout=settings.heartbeat_seconds)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now - started > limit_seconds:
            log.warning("%s: ran past its time limit of %ss; stopping it", label, limit_seconds)
            return TIMED_OUT
        try:
            with session_scope(settings.database_url) as s:
                held, cancel = leases.renew(s, model, record_id, owner=owner, lease_seconds=settings.lease_seconds)
                done = not held and _is_terminal(s, model, record_id)
        except SQLAlchemyError:
            if now - last_renewed < renew_deadline:
                log.warning("%s: could not renew the lease; retrying at the next heartbeat", label, exc_info=True)
                continue
            log.error(
                "%s: the lease could not be renewed for %.0fs; stopping the child before it expires",
                label,
                now - last_renewed,
            )
            return HEARTBEAT_FAILED
        last_renewed = now
        if held:
            if cancel:
                cancel_seen_at = cancel_seen_at or now
                if now - cancel_seen_at > settings.cancel_grace_seconds:
                    return CANCELLED  # cooperative cancel did not finish in time (invariant 3): hard stop
            continue
        try:
            return child.wait(timeout=settings.cancel_grace_seconds if done else settings.heartbeat_seconds)
        except subprocess.TimeoutExpired:
            if done:
                log.info("%s: finished, but its process did not exit; stopping it", label)
            else:
                log.warning("%s: lease lost; stopping this attempt", label)
            return LEASE_LOST


def _is_terminal(session: object, model: Leased, record_id: str) -> bool:
    """Ended, or paused: either way the child released the record itself and only has to exit."""
    status = session.scalar(select(model.status).where(model.id == record_id))  # type: ignore[attr-defined]
    return status is None or status.is_terminal or status.value == "paused"


def settle(
    settings: Settings,
    kind: WorkKind,
    record_id: str,
    owner: str,
    attempt: int,
    outcome: Outcome,
    *,
    limit_seconds: int,
) -> None:
    """Give the record the state its attempt's outcome calls for, if this attempt still holds the lease."""
    model = kind.model
    if outcome == LEASE_LOST:
        return
    if outcome == CANCELLED:
        finish_held(
            settings,
            model,
            record_id,
            owner,
            attempt,
            "cancelled",
            None,
            "cancelled (the child was stopped after the grace period)",
        )
    elif outcome == TIMED_OUT:
        finish_held(
            settings,
            model,
            record_id,
            owner,
            attempt,
            "failed",
            ("time_limit", f"the attempt ran longer than its time limit of {limit_seconds}s", None),
            f"time limit of {limit_seconds}s reached",
        )
    elif outcome == HEARTBEAT_FAILED:
        retry(settings, model, record_id, owner, attempt, "the worker lost its database connection", transient=True)
    elif outcome == 0:
        # The child settles its own record; one that exited 0 without doing so (it found the lease gone, or
        # crashed quietly) leaves it to a retry.
        retry(
            settings, model, record_id, owner, attempt, f"{kind.label} process exited without finishing", transient=True
        )
    else:
        assert isinstance(outcome, int)
        reason = (
            f"{kind.label} process exited with {'signal ' + str(-outcome) if outcome < 0 else 'code ' + str(outcome)}"
        )
        retry(settings, model, record_id, owner, attempt, reason, transient=outcome == EXIT_TRANSIENT or outcome < 0)
    after_attempt(settings, model, record_id)


def finish_held(
    settings: Settings,
    model: Leased,
    record_id: str,
    owner: str,
    attempt: int,
    status_name: str,
    error: tuple[str, str, str | None] | None,
    message: str,
) -> None:
    with session_scope(settings.database_url) as s:
        if leases.finish(s, model, record_id, owner=owner, status_name=status_name, error=error):
            leases.note(
                s,
                model,
                record_id,
                f"{kind_word(model)} {message}",
                attempt=attempt,
                level="info" if status_name == "cancelled" else "error",
            )


def kind_word(model: Leased) -> str:
    return KINDS[model].label.replace("_", " ")


def retry(
    settings: Settings, model: Leased, record_id: str, owner: str, attempt: int, reason: str, *, transient: bool
) -> None:
    """After a failed attempt: queue another (and send it) while attempts are left and it was transient; else
    failed, or cancelled when a cancel was asked. Nothing happens if another attempt holds the lease now."""
    try:
        with session_scope(settings.database_url) as s:
            row = leases.get(s, model, record_id)
            if row is None or row.lease_owner != owner or row.status.is_terminal:
                return
            if transient and row.attempt_count < row.max_attempts:
                state = leases.release_for_retry(s, model, record_id, owner=owner, reason=f"{reason}; retrying")
            else:
                state = "cancelled" if row.cancel_requested else "failed"
                error = None if state == "cancelled" else ("worker_lost", f"{reason}; no attempts left", None)
                leases.finish(s, model, record_id, owner=owner, status_name=state, error=error)
            if state is None:
                return
            leases.note(
                s,
                model,
                record_id,
                f"{reason}; retrying" if state == "queued" else f"{kind_word(model)} {state}: {reason}",
                attempt=attempt,
                level="warning" if state == "queued" else "error",
            )
            if state == "queued":
                commit_and_send(s, settings, model, record_id)
    except SQLAlchemyError:
        # The lease then expires on its own and the reconciler gives the record to another attempt.
        log.warning(
            "%s %s: could not record the attempt's end; the lease will expire",
            kind_word(model),
            record_id,
            exc_info=True,
        )


def after_attempt(settings: Settings, model: Leased, record_id: str) -> None:
    """Once a job ended: send the evaluations its success queued, and free its checkpoints (no retry needs them)."""
    if model is not Job:
        return
    try:
        with session_scope(settings.database_url) as s:
            job = s.get(Job, record_id)
            if job is None or not job.status.is_terminal:
                return  # a retry may resume from the last checkpoint
            pending = list(
                s.scalars(
                    select(Evaluation.id).where(Evaluation.job_id == record_id, Evaluation.status == WorkStatus.queued)
                )
            )
    except SQLAlchemyError:
        log.warning("job %s: could not look up its end; the reconciler's sweeper takes over", record_id, exc_info=True)
        return
    for evaluation_id in pending:
        send_committed(settings, Evaluation, evaluation_id)
    shutil.rmtree(Store(settings).job_dir(record_id), ignore_errors=True)


def _kill(child: Child) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


@worker_init.connect
def _start_fork_server(**_: object) -> None:
    """Start preloading at worker boot, so that the first attempt already starts warm."""
    if get_settings().warm_children:
        forkserver.server().start()


@worker_shutdown.connect
def _stop_fork_server(**_: object) -> None:
    forkserver.server().stop()
