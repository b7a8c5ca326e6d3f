"""The request guard: what every request passes before routing, before its body is read.

1. With auth off (a loopback bind only, api/main.py) every request is the default tenant's, so what a browser sends
   matters: the Host must be a loopback name or address (a DNS-rebound name is a 403 `host_not_allowed`) and an
   Origin, when sent, must be the Host itself (another site's page posting cross-site is a 403
   `cross_site_request`).
2. With auth on, a request to any route but the open ones (probes, /metrics, the docs) must carry a valid
   bearer key, or it is refused with the same 401 the route dependency gives (`missing_api_key` /
   `invalid_api_key`, `WWW-Authenticate: Bearer`). Unknown keys cost one indexed lookup in a worker thread;
   valid ones are remembered for `auth_cache_seconds` (the route's own dependency still checks every request,
   so a revoked key is refused at once, only after its body was read).
3. The body is capped by route: `POST /datasets` at max_upload_bytes, `POST /adapters` at
   max_adapter_upload_bytes (each plus max_multipart_overhead_bytes of multipart framing), every other route at
   max_json_body_bytes. A Content-Length over the cap is a 413 at once; a chunked or streamed body is counted
   as it arrives and refused with 413 as soon as it passes the cap.
4. A NUL character in the URL (path or query) is a 422 naming the part: Postgres text cannot hold one, so every
   route that looks an id up would otherwise fail inside the database.
5. Uploads (POST /datasets, /v1/files, /adapters) in progress at once are capped per tenant and API process
   (max_concurrent_uploads_per_tenant): past it a 429 with Retry-After, before a byte of the body is spooled.

Every refusal is in the one error shape (api/errors.py) and names the limit's setting or the field.

SecurityHeaders adds to every answer (the guard's refusals too) a Content-Security-Policy (the console's allows
only this host's scripts, styles and fetches; the JSON API's allows nothing), frame-ancestors 'none' with
X-Frame-Options DENY, X-Content-Type-Options nosniff and Referrer-Policy no-referrer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from urllib.parse import parse_qsl

import anyio
from fastapi.security.utils import get_authorization_scheme_param
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.auth import key_sha256, tenant_for_key
from core.db import session_scope
from core.errors import (
    Forbidden,
    InvalidInput,
    PayloadTooLarge,
    RateLimited,
    RetryLater,
    TuneserveError,
    Unauthenticated,
)
from core.models import DEFAULT_TENANT_ID
from core.serving_contract import is_loopback
from core.settings import Settings

log = logging.getLogger(__name__)

# The routes whose body is a multipart upload, with the setting that caps it.
# /v1/files is a dataset upload (the OpenAI view of POST /datasets): the same cap.
UPLOAD_LIMITS = {
    ("POST", "/datasets"): "max_upload_bytes",
    ("POST", "/v1/files"): "max_upload_bytes",
    ("POST", "/adapters"): "max_adapter_upload_bytes",
}
# The routes whose body is an upload that the API spools and parses (or unpacks in a child): each holds one of the
# tenant's upload slots while it runs.
UPLOAD_ROUTES = frozenset({("POST", "/datasets"), ("POST", "/v1/files"), ("POST", "/adapters")})
MAX_CACHED_KEYS = 10_000


class BodyTooLarge(Exception):
    """Raised from receive() once a streamed body passes its cap; the guard answers 413 in place of the app."""


def _route_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.rstrip("/") or "/"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _nul_in_url(scope: Scope) -> str | None:
    """The part of the URL that holds a NUL character (`path`, or the query parameter's name), if one does.

    No string the API stores or looks up may hold NUL: Postgres text cannot, and an id with one would be the
    database's error (a 500) deep inside a query, on every route that takes an id.
    """
    if "\x00" in scope.get("path", ""):
        return "path"
    query = scope.get("query_string", b"")
    if b"%00" in query.lower() or b"\x00" in query:
        for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if "\x00" in key or "\x00" in value:
                return key.replace("\x00", "") or "query"
        return "query"
    return None


def _host_name(host: str) -> str:
    """The name or address of a Host header or an Origin's authority, without its port (`[::1]:80` -> `::1`)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cross_site(scope: Scope) -> Forbidden | None:
    """With auth off: a Host that is not loopback (DNS rebinding) or an Origin that is not the Host (CSRF)."""
    host = _header(scope, b"host") or ""
    if not is_loopback(_host_name(host)):
        return Forbidden(
            f"Host {host[:100]!r} is refused: with TUNESERVE_AUTH_ENABLED=false only a loopback Host is served "
            "(localhost, 127.0.0.1, [::1])",
            param="Host",
            code="host_not_allowed",
        )
    origin = _header(scope, b"origin")
    if origin is not None and origin.lower().split("://", 1)[-1].rstrip("/") != host.lower():
        return Forbidden(
            f"Origin {origin[:100]!r} is refused: with TUNESERVE_AUTH_ENABLED=false only pages of this host may send "
            "requests",
            param="Origin",
            code="cross_site_request",
        )
    return None


class RequestGuard:
    """Pure ASGI middleware (no body buffering): authentication, then the body-size cap."""

    def __init__(
        self, app: ASGIApp, settings: Settings, open_paths: Iterable[str], open_prefixes: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.settings = settings
        self.open_paths = frozenset(p.rstrip("/") or "/" for p in open_paths)
        # Whole trees without a key (the console's pages and static files, which hold no tenant data), each "/x/".
        self.open_prefixes = tuple(p.rstrip("/") + "/" for p in open_prefixes)
        self._valid_keys: dict[str, tuple[float, str]] = {}  # sha256 of a key -> (trusted until, its tenant)
        self._uploads: dict[str, int] = {}  # tenant -> uploads in progress (one event loop: plain counting is exact)

    def body_limit(self, method: str, path: str) -> tuple[int, str, str | None]:
        """The cap on this request's body: (bytes, the setting's name, the param a 413 names)."""
        setting = UPLOAD_LIMITS.get((method, path))
        if setting is None:
            return self.settings.max_json_body_bytes, "max_json_body_bytes", None
        return getattr(self.settings, setting) + self.settings.max_multipart_overhead_bytes, setting, "file"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = _route_path(scope), scope.get("method", "GET")
        tenant: str | None = DEFAULT_TENANT_ID
        if not self.settings.auth_enabled:
            refused = _cross_site(scope)
            if refused is not None:
                await _send_error(send, refused)
                return
        if self.settings.auth_enabled and path not in self.open_paths and not path.startswith(self.open_prefixes):
            refusal, tenant = await self._authenticate(scope)
            if refusal is not None:
                await _send_error(send, refusal)
                return
        nul = _nul_in_url(scope)
        if nul is not None:
            await _send_error(
                send, InvalidInput(f"{nul}: NUL (%00) is not accepted in a URL", param=nul, code="invalid_value")
            )
            return
        limit, setting, param = self.body_limit(method, path)
        too_large = PayloadTooLarge(
            f"the request body is larger than the limit of {limit} bytes (TUNESERVE_{setting.upper()})",
            param=param,
        )
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await _send_error(send, too_large)
            return
        if (method, path) not in UPLOAD_ROUTES or tenant is None:  # None: the key was not checked here (DB down)
            await self._call_counting(scope, receive, send, limit, too_large)
            return
        running, cap = self._uploads.get(tenant, 0), self.settings.max_concurrent_uploads_per_tenant
        if running >= cap:
            await _send_error(
                send,
                RateLimited(
                    f"{running} uploads of this tenant are in progress; the limit is {cap} at once "
                    "(TUNESERVE_MAX_CONCURRENT_UPLOADS_PER_TENANT)",
                    param="max_concurrent_uploads_per_tenant",
                    code="too_many_concurrent_uploads",
                    retry_after=1,
                ),
            )
            return
        self._uploads[tenant] = running + 1
        try:
            await self._call_counting(scope, receive, send, limit, too_large)
        finally:
            left = self._uploads[tenant] - 1
            if left:
                self._uploads[tenant] = left
            else:
                del self._uploads[tenant]

    async def _call_counting(
        self, scope: Scope, receive: Receive, send: Send, limit: int, too_large: PayloadTooLarge
    ) -> None:
        received = 0
        exceeded = started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # whatever the app answers to a body it could not read, the client gets the 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _send_error(send, too_large)

    async def _authenticate(self, scope: Scope) -> tuple[TuneserveError | None, str | None]:
        """(None, the key's tenant) if the request may go on; else the 401 the route dependency (api/deps.py) would
        give. The tenant is None when the database could not be asked (the route checks the key then)."""
        scheme, credentials = get_authorization_scheme_param(_header(scope, b"authorization"))
        if not (scheme and credentials) or scheme.lower() != "bearer":
            missing = Unauthenticated(
                "send an API key: Authorization: Bearer <key>", param="Authorization", code="missing_api_key"
            )
            return missing, None
        digest = key_sha256(credentials)
        now = time.monotonic()
        until, tenant = self._valid_keys.get(digest, (0.0, ""))
        if until > now:
            return None, tenant
        try:
            tenant = await anyio.to_thread.run_sync(self._lookup, credentials)
        except Unauthenticated as e:
            return e, None
        except Exception as e:  # noqa: BLE001 - the database is down: let the route answer as it does today
            log.warning("request guard: key lookup failed (%s); the route checks the key", type(e).__name__)
            return None, None
        if len(self._valid_keys) >= MAX_CACHED_KEYS:
            self._valid_keys.clear()
        self._valid_keys[digest] = (now + self.settings.auth_cache_seconds, tenant)
        return None, tenant

    def _lookup(self, credentials: str) -> str:
        with session_scope(self.settings.database_url) as session:
            return tenant_for_key(session, credentials)


async def _send_error(send: Send, error: TuneserveError) -> None:
    """The one error shape (api/errors.py), answered here; a refused body's connection is closed after it, since
    the client may still be sending the body."""
    headers = {}
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(error, PayloadTooLarge):
        headers["Connection"] = "close"
    if isinstance(error, RetryLater):
        headers["Retry-After"] = str(error.retry_after)
    response = JSONResponse(error.to_dict(), status_code=error.status_code, headers=headers)
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


# The console (templates, console.js, vendored Alpine.js and uPlot): scripts, styles, images and fetches from this
# host only. Alpine.js evaluates its x- attributes with Function(), hence 'unsafe-eval' (its CSP build would need
# every expression rewritten); no inline script or style attribute is in any template, so no 'unsafe-inline'.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-eval'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# Every other answer is JSON, an event stream or a file: nothing in it may load or run anything.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)


class SecurityHeaders:
    """Adds the security headers to every HTTP answer; a route that sets its own CSP (/docs, with the hashes of
    its inline script) keeps it."""

    def __init__(self, app: ASGIApp, console_prefix: str) -> None:
        self.app = app
        self.console_prefix = console_prefix.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        console = path == self.console_prefix or path.startswith(self.console_prefix + "/")
        csp = (CONSOLE_CSP if console else API_CSP).encode()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {bytes(k).lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", csp))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
