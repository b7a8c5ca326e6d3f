"""The reconciler: SQL is the source of truth, so whatever the broker or a dead worker left behind is settled
from SQL. One loop over the kinds of leased work (jobs, evaluations, adapter operations), then the sweeper."""

from __future__ import annotations

import logging
import threading
import time

from core.db import session_scope
from core.models import utcnow
from core.queue import TASKS, send_committed
from core.repository import adapters as adapters_repo
from core.repository import leases
from core.settings import Settings
from core.sweeper import sweep

log = logging.getLogger("tuneserve.reconcile")


def reconcile_once(settings: Settings, *, with_sweep: bool = True) -> list[str]:
    """Settle and re-send leased work, settle imports whose canary failed for good, sweep; the ids sent.

    For each kind: cancel-requested work nobody runs any more is cancelled; running work whose lease expired
    with no attempts left is failed; queued work nobody claimed, and running work whose lease expired, is sent
    again, with backoff (leases.due_for_redispatch) so duplicate messages stay bounded while workers are busy.
    """
    now = utcnow()
    sent: list[str] = []
    for model in TASKS:
        with session_scope(settings.database_url) as s:
            for record_id in leases.settle_cancelled(s, model, now=now):
                leases.note(s, model, record_id, "cancelled (its worker was gone)")
            for record_id in leases.fail_abandoned(s, model, now=now):
                leases.note(s, model, record_id, "failed: worker lost, no attempts left", level="error")
            due = leases.claim_redispatch(s, model, now=now, requeue_after_seconds=settings.requeue_after_seconds)
        sent += [record_id for record_id in due if send_committed(settings, model, record_id)]
    if sent:
        log.info("reconciler re-sent %d record(s): %s", len(sent), ", ".join(sent))
    with session_scope(settings.database_url) as s:
        settled = adapters_repo.settle_failed_canaries(s)
    if settled:
        log.warning("imported adapter(s) whose canary could not run are unhealthy: %s", ", ".join(settled))
    if with_sweep:
        sweep(settings, now=now)
    return sent


class ReconcilerThread(threading.Thread):
    """Runs reconcile_once every interval until stopped (started by the API process)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="tuneserve-reconciler", daemon=True)
        self.settings = settings
        self.stopped = threading.Event()

    def run(self) -> None:
        last_sweep = 0.0
        while not self.stopped.wait(self.settings.reconcile_interval_seconds):
            # The sweeper lists the store and reads every path: every sweep_interval_seconds, not every round.
            with_sweep = time.monotonic() - last_sweep >= self.settings.sweep_interval_seconds
            try:
                reconcile_once(self.settings, with_sweep=with_sweep)
                if with_sweep:
                    last_sweep = time.monotonic()
            except Exception:
                log.exception("reconcile round failed")

    def stop(self) -> None:
        self.stopped.set()
