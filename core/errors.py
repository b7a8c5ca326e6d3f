"""One error family for the whole service; the API renders each as {"error": {type, code, message, param}}."""

from __future__ import annotations

import re

# An absolute POSIX path of two parts or more (not one inside a URL): /data/store/tmp/x/upload.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"/:,;()\[\]{}<>]+/)+([^\s'\"/:,;()\[\]{}<>]*)")


def redact_paths(text: str) -> str:
    """A message with every absolute filesystem path cut to its last part (`.../upload`).

    For messages built from an exception's text that a client sees (job errors, an adapter's servable_reason, an
    archive that cannot be read): where the server keeps its files is not the client's business, and the file's
    own name is what helps.
    """
    return _ABSOLUTE_PATH.sub(lambda m: f".../{m.group(1)}" if m.group(1) else "...", text)


class TuneserveError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code = "bad_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, object]:
        return {"error": {"type": self.type, "code": self.code, "message": self.message, "param": self.param}}


class InvalidInput(TuneserveError):
    status_code = 422
    code = "invalid_value"


class Unauthenticated(TuneserveError):
    """No API key, or one that is unknown or revoked (401 with WWW-Authenticate: Bearer)."""

    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(TuneserveError):
    """A request this deployment refuses whoever sends it (a browser's cross-site request with auth off)."""

    status_code = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(TuneserveError):
    status_code = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(TuneserveError):
    status_code = 409
    type = "conflict_error"
    code = "conflict"


class PayloadTooLarge(TuneserveError):
    status_code = 413
    code = "payload_too_large"


class RetryLater(TuneserveError):
    """An error the client fixes by waiting: the API sends Retry-After with it."""

    def __init__(self, message: str, *, retry_after: int = 5, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServiceUnavailable(RetryLater):
    status_code = 503
    type = "service_unavailable_error"
    code = "unavailable"


class RateLimited(RetryLater):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limited"


class TrainingError(Exception):
    """A failure inside a training attempt, with the code and param a user acts on.

    The message is stored as the job's (or operation's) error and shown to its tenant, and is often built from
    another exception's text: absolute server paths in it are cut to their last part (redact_paths).
    """

    def __init__(self, code: str, message: str, *, param: str | None = None, transient: bool = False) -> None:
        message = redact_paths(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.transient = transient
