"""What clients read back never carries the server's filesystem paths (job errors, servable reasons, archive errors),
and .env.example's public placeholders are refused as secrets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.errors import TrainingError, redact_paths
from core.settings import PLACEHOLDER_SECRET, Settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[Errno 2] No such file or directory: '/data/store/tmp/abc/upload'",
            "[Errno 2] No such file or directory: '.../upload'",
        ),
        ("Loading lora /tmp/pytest-of-u/x/adapters/ft-a failed", "Loading lora .../ft-a failed"),
        ("OSError at /var/lib/x/", "OSError at ..."),
        (
            "see http://serving:8100/v1/x and redis://redis:6379/0",
            "see http://serving:8100/v1/x and redis://redis:6379/0",
        ),
        ("ratio 1/2, a/b/c and /single", "ratio 1/2, a/b/c and /single"),
    ],
)
def test_redact_paths(text: str, expected: str) -> None:
    assert redact_paths(text) == expected


def test_training_errors_carry_no_server_paths() -> None:
    """worker/training.py's run() builds a job's error from the exception's text; TrainingError cuts the paths."""
    error = TrainingError(
        "training_error", "FileNotFoundError: [Errno 2] No such file: '/data/store/jobs/ftjob-1/ckpt-4'"
    )
    assert error.message == "FileNotFoundError: [Errno 2] No such file: '.../ckpt-4'" and "/data" not in str(error)


def test_serving_reasons_carry_no_server_paths() -> None:
    from serving.adapters import _first_line

    reason = _first_line(RuntimeError("Loading lora /data/store/adapters/imp-x/adapter_model.safetensors failed\nmore"))
    assert reason == "Loading lora .../adapter_model.safetensors failed"


@pytest.mark.parametrize("field", ["serving_token", "metrics_token"])
def test_placeholder_secrets_are_refused_at_startup(field: str, tmp_path) -> None:
    with pytest.raises(ValidationError, match=f"{field} still holds the .env.example placeholder"):
        Settings(data_dir=tmp_path, **{field: f"{PLACEHOLDER_SECRET}-serving-token"})  # type: ignore[arg-type]
    Settings(data_dir=tmp_path, **{field: "a-real-secret"})  # type: ignore[arg-type]
