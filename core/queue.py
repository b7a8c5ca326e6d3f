"""The Celery app (broker carries job ids only) and the one way to send work to it."""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery
from sqlalchemy.orm import Session

from core.models import AdapterOperation, Evaluation, Job
from core.repository import leases
from core.repository.leases import Leased
from core.settings import Settings

log = logging.getLogger(__name__)

TRAIN_TASK = "tuneserve.train"
EVALUATE_TASK = "tuneserve.evaluate"
ADAPTER_OPERATION_TASK = "tuneserve.adapter_operation"


# kombu's Redis transport (5.7) looks for unacked messages older than the visibility timeout every
# unacked_restore_interval (10 s) x unacked_restore_throttle (10) = about 100 s, and once when a worker starts.
# The unacked index is one per Redis database, and each idle worker sweeps it with its own timeout: every worker
# on a database needs the same broker_visibility_timeout_seconds.
KOMBU_RESTORE_SWEEP_SECONDS = 100
DEFAULT_VISIBILITY_TIMEOUT_SECONDS = 6 * 3600


def redis_transport_options(visibility_timeout_seconds: int) -> dict[str, int]:
    """Redis: an unacked message is re-delivered about `visibility_timeout_seconds` after a worker took it."""
    options = {"visibility_timeout": visibility_timeout_seconds}
    if visibility_timeout_seconds < KOMBU_RESTORE_SWEEP_SECONDS:
        # A timeout shorter than kombu's sweep would come back up to 100 s late: sweep at least twice per timeout.
        options |= {"unacked_restore_interval": max(1, visibility_timeout_seconds // 2), "unacked_restore_throttle": 1}
    return options


@lru_cache(maxsize=4)
def make_celery(
    broker_url: str, queue_name: str, visibility_timeout_seconds: int = DEFAULT_VISIBILITY_TIMEOUT_SECONDS
) -> Celery:
    app = Celery("tuneserve", broker=broker_url)
    app.conf.update(
        task_default_queue=queue_name,
        # SQL is the source of truth; a message is acked only after the task ran, and a duplicate is
        # turned away by the lease (docs/architecture.md, invariants 1 and 2).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if broker_url.startswith(("redis://", "rediss://")):
        # Redis re-delivers an unacked message after this long (settings.broker_visibility_timeout_seconds);
        # longer than any training attempt, and a duplicate delivery is turned away by the lease anyway.
        app.conf.broker_transport_options = redis_transport_options(visibility_timeout_seconds)
    return app


def celery_for(settings: Settings) -> Celery:
    return make_celery(settings.broker_url, settings.queue_name, settings.broker_visibility_timeout_seconds)


TASKS: dict[type, str] = {Job: TRAIN_TASK, Evaluation: EVALUATE_TASK, AdapterOperation: ADAPTER_OPERATION_TASK}


def send(settings: Settings, model: Leased, record_id: str) -> None:
    """Publish a committed record's id to the workers (raises on a broker error); see commit_and_send."""
    # Few, short publish retries: a broker that is down must not hold the API request for minutes;
    # the row is already committed and the reconciler re-sends it.
    celery_for(settings).send_task(
        TASKS[model],
        args=[record_id],
        queue=settings.queue_name,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
    )


def send_committed(settings: Settings, model: Leased, record_id: str) -> bool:
    """Send the id of a record already committed to SQL; False when the broker failed.

    Nothing is lost then: the record stays queued in SQL and the reconciler sends it later.
    """
    try:
        send(settings, model, record_id)
        return True
    except Exception:
        log.warning("could not send %s to the broker; the reconciler will resend it", record_id, exc_info=True)
        return False


def commit_and_send(session: Session, settings: Settings, model: Leased, *record_ids: str) -> bool:
    """The one way work reaches the workers: record the send, commit, and only then publish each id.

    The row exists before any worker can hear of it (invariant 1), and the recorded send starts the reconciler's
    backoff for it, so a send that fails (False) is retried by the reconciler, never lost.
    """
    for record_id in record_ids:
        leases.mark_dispatched(session, model, record_id)
    session.commit()
    # A list, not a generator: every record is sent even after one fails.
    return all([send_committed(settings, model, record_id) for record_id in record_ids])  # noqa: C419
