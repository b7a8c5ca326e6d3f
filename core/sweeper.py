"""The sweeper (run by the reconciler): nothing on disk, in SQL or in the broker stays half-done after a crash.

- staging directories (store/tmp) older than sweep_min_age_seconds: an upload, import or publish killed midway;
- store directories no row points at (adapters, datasets), as old: a kill between publish and commit;
- checkpoint directories of jobs that ended: their supervisor died before freeing them;
- the evaluations a succeeded job asked for and never got (jobs that predate planning them in its success);
- with the SQLite broker, delivered messages whose record ended (kombu keeps every delivered message there).

Ages are read from the directory's ctime, which a rename updates, so a directory published a moment ago is
never taken for a leftover however old its files are.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from core.cleanup import purge_deleted_adapter_files
from core.db import get_engine, session_scope
from core.job_evaluations import plan_job_evaluations
from core.models import Adapter, Dataset, Evaluation, Job
from core.queue import TASKS, send_committed
from core.repository import jobs as jobs_repo
from core.repository.leases import Leased
from core.settings import Settings
from core.storage import Store

log = logging.getLogger("tuneserve.sweeper")


def sweep(settings: Settings, *, now: datetime) -> dict[str, list[str]]:
    """One round of every sweep; what each removed or started (for logs and tests)."""
    sweeps: dict[str, Callable[[], list[str]]] = {
        "staging": lambda: sweep_staging(settings),
        "unregistered": lambda: sweep_unregistered(settings),
        "checkpoints": lambda: sweep_checkpoints(settings),
        "evaluations": lambda: start_missing_evaluations(settings, now=now),
        "broker_messages": lambda: purge_finished_messages(settings),
        "deleted_adapter_files": lambda: purge_deleted_adapter_files(settings),
    }
    swept: dict[str, list[str]] = {}
    for what, run in sweeps.items():
        try:
            swept[what] = run()
        except Exception:
            log.exception("sweeper: %s failed; trying again next round", what)
            swept[what] = []
    for what, items in swept.items():
        if items:
            log.info("sweeper: %s: %d (%s)", what, len(items), ", ".join(items[:10]))
    return swept


def _age_seconds(path: Path) -> float:
    stat = path.stat()
    return time.time() - max(stat.st_mtime, stat.st_ctime)


def _old_dirs(parent: Path, min_age: float) -> list[Path]:
    if not parent.is_dir():
        return []
    out = []
    for child in parent.iterdir():
        try:
            if child.is_dir() and _age_seconds(child) >= min_age:
                out.append(child)
        except FileNotFoundError:
            continue  # removed meanwhile
    return out


def sweep_staging(settings: Settings) -> list[str]:
    removed = []
    for path in _old_dirs(Store(settings).root / "tmp", settings.sweep_min_age_seconds):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def sweep_unregistered(settings: Settings) -> list[str]:
    """Adapter and dataset directories that no row points at (whatever its status), older than the minimum age."""
    store = Store(settings)
    # Listed before the rows are read: a directory published after this listing is not a candidate at all.
    candidates = {
        f"{kind}/{path.name}": path
        for kind in ("adapters", "datasets")
        for path in _old_dirs(store.root / kind, settings.sweep_min_age_seconds)
    }
    if not candidates:
        return []
    with session_scope(settings.database_url) as s:
        registered = set(s.scalars(select(Adapter.path))) | set(s.scalars(select(Dataset.path)))
    removed = []
    for relative, path in candidates.items():
        if relative not in registered:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(relative)
    return removed


def sweep_checkpoints(settings: Settings) -> list[str]:
    """Job directories (checkpoints) of jobs that ended, or of no job at all (old enough)."""
    jobs_root = Store(settings).root / "jobs"
    if not jobs_root.is_dir():
        return []
    names = [p.name for p in jobs_root.iterdir() if p.is_dir()]
    if not names:
        return []
    with session_scope(settings.database_url) as s:
        # .all(): a Result has .keys(), so dict() would take it for a mapping.
        statuses: dict[str, Any] = dict(s.execute(select(Job.id, Job.status).where(Job.id.in_(names))).all())
    removed = []
    for name in names:
        path = jobs_root / name
        status = statuses.get(name)
        ended = status is not None and status.is_terminal
        try:
            orphan = status is None and _age_seconds(path) >= settings.sweep_min_age_seconds
        except FileNotFoundError:
            continue
        if ended or orphan:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


EVALUATION_SWEEP_WINDOW = timedelta(days=7)


def start_missing_evaluations(settings: Settings, *, now: datetime) -> list[str]:
    """Plan and send the before/after evaluations of succeeded jobs that have none (and asked for them)."""
    started: list[str] = []
    # Not the last few seconds (the worker that finished it may still be at it), nor older than a week.
    window = {
        "finished_after": now - EVALUATION_SWEEP_WINDOW,
        "finished_before": now - timedelta(seconds=settings.requeue_after_seconds),
    }
    with session_scope(settings.database_url) as s:
        for job in jobs_repo.succeeded_without_evaluations(s, **window):
            try:
                with s.begin_nested():  # one job that cannot be planned does not hold back the others
                    started += plan_job_evaluations(s, settings, job, job.adapter_name or "")
            except Exception:
                log.exception("sweeper: could not plan the evaluations of job %s", job.id)
    for evaluation_id in started:
        send_committed(settings, Evaluation, evaluation_id)
    return started


# kombu's SQLAlchemy transport marks a delivered message invisible and never deletes it, and it has no
# visibility timeout: an invisible row is never delivered again. Once its record ended it is dead weight.
KOMBU_MESSAGE_TABLE = "kombu_message"


def message_record(payload: str) -> tuple[Leased, str] | None:
    """The (model, record id) a kombu message of ours carries (Celery protocol 2: body = [args, kwargs, embed])."""
    try:
        message = json.loads(payload)
        model = {task: model for model, task in TASKS.items()}[message["headers"]["task"]]
        body = json.loads(base64.b64decode(message["body"]))
        return model, str(body[0][0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def purge_finished_messages(settings: Settings) -> list[str]:
    if not settings.broker_url.startswith("sqla+"):
        return []
    engine = get_engine(settings.broker_url.removeprefix("sqla+"))
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(f"SELECT id, payload FROM {KOMBU_MESSAGE_TABLE} WHERE visible = 0")).all()
    except SQLAlchemyError:
        return []  # no table yet: nothing was ever sent
    wanted = {message_id: message_record(payload) for message_id, payload in rows}
    dead: list[int] = []
    with session_scope(settings.database_url) as s:
        for message_id, record in wanted.items():
            if record is None:
                dead.append(message_id)  # not ours or unreadable: delivered already, never delivered again
                continue
            model, record_id = record
            status: Any = s.scalar(select(model.status).where(model.id == record_id))
            if status is None or status.is_terminal:
                dead.append(message_id)
    if dead:
        with engine.begin() as conn:
            for start in range(0, len(dead), 500):
                chunk = dead[start : start + 500]
                conn.execute(
                    text(
                        f"DELETE FROM {KOMBU_MESSAGE_TABLE} WHERE visible = 0 AND id IN "
                        f"({', '.join(str(int(i)) for i in chunk)})"
                    )
                )
    return [str(i) for i in dead]
