"""One error family for the whole service; the API renders each as {"error": {type, code, message, param}}."""

from __future__ import annotations


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
    """A failure inside a training attempt, with the code and param a user acts on."""

    def __init__(self, code: str, message: str, *, param: str | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.transient = transient
