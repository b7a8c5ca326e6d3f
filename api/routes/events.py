"""A job's live event stream (Server-Sent Events): what the web console's job page listens to.

`GET /jobs/{id}/events` answers a page and ends; a page that wants the loss curve as it grows would poll it. This
route does the polling on the server, once per `event_stream_poll_seconds`, and sends only what is new: each new
job event (`event: event`, its `id:` the event id, so a client resumes with `?after=`), the job itself whenever its
status, progress or loss changed (`event: job`), and `event: end` once the job is terminal. It is tenant-checked
like every job route: another tenant's job is a 404 before the stream starts.

It follows the job only for a client that asks for a stream (`Accept: text/event-stream`, as EventSource and the
console send); any other client gets one snapshot (what is there now, then `event: end`), so a plain GET of the URL
(a crawler, a test client that reads bodies to the end) never hangs on a queued job.

No database connection is held while the stream waits: every poll opens its own short session, in a worker
thread, and closes it before sleeping (invariant 6; the request's own session is scoped to the route function and
is closed before the first byte is sent).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import EventCursor, SessionDep, SettingsDep, TenantDep
from api.schemas import JobEventOut, JobOut
from api.services import evaluations as evaluations_service
from api.services import jobs as jobs_service
from core.db import get_session_factory
from core.repository import jobs as jobs_repo
from core.settings import Settings
from core.statuses import TERMINAL_STATUSES

router = APIRouter(prefix="/jobs", tags=["jobs"])

# At most this many events per poll: a client that reconnects far behind catches up over a few polls.
EVENTS_PER_POLL = 500

STREAM_DESCRIPTION = (
    "Server-Sent Events, one per new job event (`event: event`, `id:` the event id), the job whenever it changed "
    "(`event: job`, the same body as GET /jobs/{id}) and `event: end` once the job is terminal. Resume with "
    "`?after=<last id>`; the stream also ends after TUNESERVE_EVENT_STREAM_MAX_SECONDS. Without "
    "`Accept: text/event-stream` the answer is one snapshot: what is there now, then `event: end`."
)


def _sse(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _poll(settings: Settings, tenant: str, job_id: str, after: int | None) -> tuple[dict[str, Any] | None, list[Any]]:
    """One short read: the job (None if it went away) and its events after `after`."""
    with get_session_factory(settings.database_url)() as session:
        job = jobs_repo.get_owned_job(session, tenant, job_id)
        if job is None:
            return None, []
        rows, _ = jobs_repo.list_events(session, job_id, limit=EVENTS_PER_POLL, after=after)
        out = JobOut.of(job).model_copy(update={"evaluation": evaluations_service.job_summary(session, job)})
        events = [JobEventOut.of(e).model_dump(mode="json") for e in rows]
        session.rollback()  # read only: end the transaction before the connection goes back to the pool
        return out.model_dump(mode="json"), events


async def _stream(
    request: Request, settings: Settings, tenant: str, job_id: str, after: int | None, follow: bool
) -> AsyncIterator[str]:
    deadline = time.monotonic() + settings.event_stream_max_seconds
    last_job: dict[str, Any] | None = None
    # A comment line first: proxies and the browser see the stream open before the first poll has anything.
    yield ": stream open\n\n"
    while True:
        job, events = await run_in_threadpool(_poll, settings, tenant, job_id, after)
        if job is None:
            yield _sse("end", {"reason": "not_found"})
            return
        for event in events:
            after = event["id"]
            yield _sse("event", event, event_id=event["id"])
        if job != last_job:
            last_job = job
            yield _sse("job", job)
        # Terminal and caught up: the client has every event the job will ever have.
        if job["status"] in TERMINAL_STATUSES and len(events) < EVENTS_PER_POLL:
            yield _sse("end", {"reason": "terminal", "status": job["status"]})
            return
        if not follow:
            yield _sse("end", {"reason": "snapshot", "after": after})
            return
        if time.monotonic() > deadline:
            yield _sse("end", {"reason": "timeout", "after": after})
            return
        if len(events) < EVENTS_PER_POLL:
            await asyncio.sleep(settings.event_stream_poll_seconds)
        if await request.is_disconnected():
            return


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": STREAM_DESCRIPTION}
    },
)
def stream_job_events(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    job_id: str,
    after: EventCursor = None,
) -> StreamingResponse:
    """The job's events and status as they happen (SSE); what the console's job page draws its loss chart from."""
    # 404 before the stream starts; the session ends here. Not JobDep: a bad cursor is a 422 first (api/deps.py).
    jobs_service.get_job_or_404(session, tenant, job_id)
    follow = "text/event-stream" in request.headers.get("accept", "")
    return StreamingResponse(
        _stream(request, settings, tenant, job_id, after, follow),
        media_type="text/event-stream",
        # no-transform / X-Accel-Buffering: a buffering proxy would hold the events back until the stream ends.
        headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
    )
