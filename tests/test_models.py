"""The enums of core.models against the API's own names for the same values."""

from __future__ import annotations

from typing import get_args

from core.jobspec import LORA_METHODS, Method
from core.models import TrainingMethod


def test_training_methods_are_the_apis() -> None:
    assert [m.value for m in TrainingMethod] == list(get_args(Method))
    assert set(LORA_METHODS) <= {m.value for m in TrainingMethod}
