"""Test tiers by fixture: a fixture that starts a stack, the vLLM engine or a training run says so once, and
every test that uses it (directly or through other fixtures) gets the marker (tests/conftest.py applies them).

    stack     a database + broker deployment: Postgres/Redis, or the embedded SQLite stack with a worker process
    serving   the vLLM engine (`python -m serving`)
    training  a real training run
    slow      anything else that takes more than a few seconds

`make test-fast` runs the tests with none of these markers; `make test` runs everything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest

TIERS = ("stack", "serving", "training", "slow")
ATTRIBUTE = "tuneserve_markers"

F = TypeVar("F", bound=Callable[..., Any])


def requires(*markers: str) -> Callable[[F], F]:
    """Decorate a fixture function (beneath @pytest.fixture): every test using it gets `markers`."""
    unknown = set(markers) - set(TIERS)
    if unknown:
        raise ValueError(f"unknown test tier(s) {sorted(unknown)}; known: {TIERS}")

    def mark(function: F) -> F:
        setattr(function, ATTRIBUTE, (*getattr(function, ATTRIBUTE, ()), *markers))
        return function

    return mark


def apply_fixture_markers(item: pytest.Item) -> None:
    """Add the markers of every fixture `item` uses, in the closure of its fixtures."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return
    for name in info.names_closure:
        for fixturedef in info.name2fixturedefs.get(name, ()):
            for marker in getattr(fixturedef.func, ATTRIBUTE, ()):
                if marker not in item.keywords:
                    item.add_marker(getattr(pytest.mark, marker))
