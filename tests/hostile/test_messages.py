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


def test_serving_errors_keep_vllms_message_in_the_one_error_shape() -> None:
    """vLLM's errors (its own paths already cut by vLLM) come back with their status, message and param; the
    resolver's refusal and the engine's are `adapter_not_servable` naming `model`."""
    from api.services.serving_client import serving_error
    from core.serving_contract import NOT_SERVABLE_PREFIX

    refused = serving_error(
        422,
        {"error": {"message": f"{NOT_SERVABLE_PREFIX}adapter 'a' cannot be served: file x does not match its "
                   "recorded sha256 (parameter=model)", "type": "UnprocessableEntityError", "param": "model", "code": 422}},
    )  # fmt: skip
    assert (refused.status_code, refused.code, refused.param) == (422, "adapter_not_servable", "model")
    assert refused.message == "adapter 'a' cannot be served: file x does not match its recorded sha256"
    engine = serving_error(400, {"error": {"message": "LoRA adapter 'a' was found but could not be loaded."}})
    assert (engine.status_code, engine.code, engine.param) == (422, "adapter_not_servable", "model")
    knob = serving_error(400, b'{"error": {"message": "top_p must be in (0, 1]", "param": "top_p", "code": 400}}')
    assert (knob.status_code, knob.code, knob.param, knob.type) == (
        400,
        "invalid_request",
        "top_p",
        "invalid_request_error",
    )
    assert serving_error(400, b"not json").message == "serving answered 400"


@pytest.mark.parametrize("field", ["serving_token", "metrics_token"])
def test_placeholder_secrets_are_refused_at_startup(field: str, tmp_path) -> None:
    with pytest.raises(ValidationError, match=f"{field} still holds the .env.example placeholder"):
        Settings(data_dir=tmp_path, **{field: f"{PLACEHOLDER_SECRET}-serving-token"})  # type: ignore[arg-type]
    Settings(data_dir=tmp_path, **{field: "a-real-secret"})  # type: ignore[arg-type]
