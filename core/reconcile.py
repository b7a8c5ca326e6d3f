"""The reconciler: SQL is the source of truth, so whatever the broker lost is sent again from SQL."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from core.db import session_scope
from core.models import utcnow
from core.models import AdapterOperation, Evaluation
from core.queue import send_adapter_operation, send_evaluate, send_train
from core.repository import adapters as adapters_repo
from core.repository import jobs as jobs_repo
from core.repository import leases
from core.settings import Settings

log = logging.getLogger("tuneserve.reconcile")


def reconcile_once(settings: Settings) -> list[str]:
    """Re-send queued jobs nobody picked up and running jobs whose lease expired (and the same for evaluations
    and adapter operations), and settle imported adapters whose canary failed for good; returns the ids sent."""
    now = utcnow()
    with session_scope(settings.database_url) as s:
        jobs_repo.fail_abandoned(s, now=now)
        stale = jobs_repo.stale_jobs(s, queued_before=now - timedelta(seconds=settings.requeue_after_seconds), now=now)
    sent = []
    for job_id in stale:
        try:
            send_train(settings, job_id)
        except Exception:  # noqa: BLE001 - broker still down; try again next round
            log.warning("reconciler could not send job %s", job_id, exc_info=True)
            continue
        with session_scope(settings.database_url) as s:
            jobs_repo.touch_job(s, job_id)
        sent.append(job_id)
    if sent:
        log.info("reconciler re-sent %d job(s): %s", len(sent), ", ".join(sent))
    sent += reconcile_leased_work(settings)
    with session_scope(settings.database_url) as s:
        settled = adapters_repo.settle_failed_canaries(s)
    if settled:
        log.warning("imported adapter(s) whose canary could not run are unhealthy: %s", ", ".join(settled))
    return sent


def reconcile_leased_work(settings: Settings) -> list[str]:
    """The same for evaluations and adapter operations."""
    now = utcnow()
    sent = []
    for model, send in ((Evaluation, send_evaluate), (AdapterOperation, send_adapter_operation)):
        with session_scope(settings.database_url) as s:
            leases.fail_abandoned(s, model, now=now)
            stale = leases.stale(s, model, queued_before=now - timedelta(seconds=settings.requeue_after_seconds), now=now)
        for record_id in stale:
            try:
                send(settings, record_id)
            except Exception:  # noqa: BLE001 - broker still down; try again next round
                log.warning("reconciler could not send %s", record_id, exc_info=True)
                continue
            with session_scope(settings.database_url) as s:
                leases.touch(s, model, record_id)
            sent.append(record_id)
    return sent


class ReconcilerThread(threading.Thread):
    """Runs reconcile_once every interval until stopped (started by the API process)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="tuneserve-reconciler", daemon=True)
        self.settings = settings
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.settings.reconcile_interval_seconds):
            try:
                reconcile_once(self.settings)
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the loop
                log.exception("reconcile round failed")

    def stop(self) -> None:
        self.stopped.set()
