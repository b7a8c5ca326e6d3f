"""GET /jobs/{id}/events/stream (SSE), the console's live feed: tenant-checked, resumable, ends when the job does.

No browser and no worker: a job is made and cancelled while queued, so its stream has a status to send and ends."""

from __future__ import annotations

import json

import httpx

from tests.support.stack import bearer
from tests.ui.conftest import ConsoleStack
from tests.ui.test_console import queued_job

FOLLOW = {"Accept": "text/event-stream"}


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], "message"
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line.split(":", 1)[1])))
    return events


def test_stream_sends_the_job_and_ends_when_it_is_terminal(console_stack: ConsoleStack) -> None:
    job = queued_job(console_stack, console_stack.key_a)
    with httpx.Client(base_url=console_stack.url, headers=bearer(console_stack.key_a), timeout=30) as client:
        assert client.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        with client.stream("GET", f"/jobs/{job['id']}/events/stream", headers=FOLLOW) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = read_events(response)
        names = [n for n, _ in events]
        assert names[-1] == "end" and events[-1][1] == {"reason": "terminal", "status": "cancelled"}
        jobs = [body for n, body in events if n == "job"]
        assert len(jobs) == 1 and jobs[0]["id"] == job["id"] and jobs[0]["status"] == "cancelled"
        sent = [body for n, body in events if n == "event"]
        listed = client.get(f"/jobs/{job['id']}/events").json()["data"]
        assert [e["id"] for e in sent] == [e["id"] for e in listed]
        # Resuming after the last event sends no event twice.
        if sent:
            url = f"/jobs/{job['id']}/events/stream?after={sent[-1]['id']}"
            with client.stream("GET", url, headers=FOLLOW) as response:
                assert [n for n, _ in read_events(response)] == ["job", "end"]


def test_stream_is_tenant_checked(console_stack: ConsoleStack) -> None:
    job = queued_job(console_stack, console_stack.key_a)
    with httpx.Client(base_url=console_stack.url, timeout=30) as client:
        other = client.get(f"/jobs/{job['id']}/events/stream", headers=bearer(console_stack.key_b))
        assert other.status_code == 404 and other.json()["error"]["param"] == "job_id"
        assert client.get(f"/jobs/{job['id']}/events/stream").status_code == 401
        bad = client.get(f"/jobs/{job['id']}/events/stream?after=-1", headers=bearer(console_stack.key_a))
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "after"


def test_without_accept_event_stream_it_is_one_snapshot(console_stack: ConsoleStack) -> None:
    """A queued job never ends by itself; a client that did not ask to follow it still gets an answer that ends."""
    job = queued_job(console_stack, console_stack.key_a)
    with httpx.Client(base_url=console_stack.url, headers=bearer(console_stack.key_a), timeout=10) as client:
        response = client.get(f"/jobs/{job['id']}/events/stream")
        assert response.status_code == 200
        events = read_events(response)
        assert [n for n, _ in events][-2:] == ["job", "end"]
        assert events[-1][1]["reason"] == "snapshot" and events[-2][1]["status"] == "queued"
        # Following it instead: the job, then nothing until it changes (cut here by the read timeout).
        with client.stream("GET", f"/jobs/{job['id']}/events/stream", headers=FOLLOW, timeout=3) as stream:
            lines = []
            try:
                for line in stream.iter_lines():
                    lines.append(line)
            except httpx.ReadTimeout:
                pass
        assert "event: job" in lines and "event: end" not in lines
