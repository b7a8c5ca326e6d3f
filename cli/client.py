"""A small HTTP client of the tuneserve API that turns the API's error shape into one exception."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx

DEFAULT_API_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """The API answered with an error: `{"error": {"type", "code", "message", "param"}}`, or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.retry_after = retry_after

    @classmethod
    def of(cls, response: httpx.Response) -> ApiError:
        try:
            error = response.json()["error"]
            message, code, param = str(error["message"]), error.get("code"), error.get("param")
        except (ValueError, KeyError, TypeError):  # not our error shape: a proxy, or an older API
            message, code, param = response.text.strip()[:500] or response.reason_phrase, None, None
        return cls(
            message,
            status=response.status_code,
            code=code,
            param=param,
            retry_after=response.headers.get("retry-after"),
        )


class Api:
    """Calls the API at `base_url`; every method returns the decoded JSON body or raises ApiError."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ApiError(f"cannot reach the tuneserve API at {self.base_url}: {e}") from e
        if response.status_code >= 400:
            raise ApiError.of(response)
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def pages(self, path: str, *, limit: int, **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of a paginated list, following the `after` cursor (the last item's id)."""
        after = None
        while True:
            page = self.get(path, limit=limit, after=after, **params)
            yield from page["data"]
            if not page["has_more"] or not page["data"]:
                return
            after = page["data"][-1]["id"]

    def close(self) -> None:
        self.http.close()
