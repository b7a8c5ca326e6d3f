"""Serving restarted (a deploy, a crash and its supervisor): every adapter is served again with no manual step.

Serving keeps nothing the API depends on: an adapter is looked up in SQL and loaded from the store on the
first request that names it, so a fresh engine answers exactly as the old one did. This restarts the session's
one engine (never a second one alongside it) and leaves it running for whatever test comes next.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.generation import PROMPTS, Reference, generate, make_adapter, unique
from tests.support.serving import ServingProcess
from tests.support.stack import Stack


def _greedy(stack: Stack, adapter: str | None) -> list[int]:
    response = generate(stack, PROMPTS[1], adapter=adapter)
    assert response.status_code == 200, response.text
    return list(response.json()["token_ids"])


def test_restarted_serving_serves_the_same_adapters_without_a_reload_step(
    serving_stack: Stack, model_dir: Path
) -> None:
    serving: ServingProcess = serving_stack.extra["serving"]
    name = unique("restart")
    make_adapter(serving_stack, Reference(model_dir), name, seed=41)
    before, base_before = _greedy(serving_stack, name), _greedy(serving_stack, None)
    assert before != base_before, "the adapter must change the output, or equality after the restart proves nothing"
    loaded = f"Resolved and loaded LoRA adapter '{name}'"
    assert serving.log.read_text().count(loaded) == 1

    old_pid = serving.process.pid
    serving.restart()
    assert serving.process.pid != old_pid
    assert name not in serving.loaded_adapters()  # a fresh engine

    # The API's client, unchanged: its pooled connections to the old process must not fail the first request.
    assert _greedy(serving_stack, name) == before
    assert serving.log.read_text().count(loaded) == 2  # loaded again, on demand, by the new engine
    assert _greedy(serving_stack, None) == base_before
