"""/docs with its JavaScript, CSS and favicon served by the API itself.

FastAPI's defaults load Swagger UI from cdn.jsdelivr.net and its favicon from fastapi.tiangolo.com: on a machine
without internet /docs is a blank page. This is FastAPI's "self-hosting JavaScript and CSS for docs" recipe: the
app is made with docs_url=None and redoc_url=None, and these routes render the same page pointing at the vendored
files (api/ui/static/vendor). ReDoc is not kept: its standalone bundle fetches its logo from cdn.redoc.ly whatever
the options, and Swagger UI (with "Try it out") already documents every route.
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

from api.ui.assets import SWAGGER_CSS, SWAGGER_FAVICON, SWAGGER_JS

DOCS_URL = "/docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"


_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def with_csp(page: HTMLResponse) -> HTMLResponse:
    """The page with a CSP that lets only its own inline scripts run (by their sha256) besides this host's files;
    Swagger UI sets style attributes, so styles may be inline."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(bytes(page.body).decode())
    )
    page.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )
    return page


def install_docs(app: FastAPI) -> None:
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui_html() -> HTMLResponse:
        return with_csp(
            get_swagger_ui_html(
                openapi_url=openapi_url,
                title=f"{app.title} - Swagger UI",
                oauth2_redirect_url=OAUTH2_REDIRECT_URL,
                swagger_js_url=SWAGGER_JS,
                swagger_css_url=SWAGGER_CSS,
                swagger_favicon_url=SWAGGER_FAVICON,
                # No badge from validator.swagger.io: nothing on the page may leave the machine.
                swagger_ui_parameters={"validatorUrl": None},
            )
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return with_csp(get_swagger_ui_oauth2_redirect_html())
