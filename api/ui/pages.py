"""The console's pages: HTML shells rendered from templates, with no data in them.

Each page is a template plus an Alpine.js component (static/js/console.js) that fetches what it shows from the JSON
API with the key the user signed in with. The server needs to know nothing about the user to send a page, so these
routes take no key, no session and no database connection.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from api.ui import assets
from api.ui.docs import DOCS_URL
from core.statuses import TERMINAL_STATUSES

PAGES = {
    "datasets": "Datasets",
    "jobs": "Jobs",
    "adapters": "Adapters",
    "playground": "Playground",
}

templates = Jinja2Templates(directory=assets.TEMPLATES_DIR)


def _render(request: Request, template: str, title: str, nav: str, **context: object) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        template,
        {
            "title": title,
            "nav": nav,
            "pages": PAGES,
            "assets": assets,
            "prefix": assets.CONSOLE_PREFIX,
            "terminal_statuses": " ".join(sorted(TERMINAL_STATUSES)),
            "docs_url": DOCS_URL,
            # Whether the sign-in page must ask for a key: with auth off (make demo) there is none to ask for.
            "auth_enabled": request.app.state.settings.auth_enabled,
            **context,
        },
    )


def install_console(app: FastAPI) -> None:
    prefix = assets.CONSOLE_PREFIX
    app.mount(assets.STATIC_PREFIX, StaticFiles(directory=assets.STATIC_DIR), name="ui-static")

    @app.get(prefix, include_in_schema=False)
    async def sign_in_page(request: Request) -> HTMLResponse:
        return _render(request, "signin.html", "Sign in", "signin")

    @app.get(f"{prefix}/", include_in_schema=False)
    async def slash() -> RedirectResponse:
        return RedirectResponse(prefix)

    @app.get(f"{prefix}/datasets", include_in_schema=False)
    async def datasets_page(request: Request) -> HTMLResponse:
        return _render(request, "datasets.html", "Datasets", "datasets")

    @app.get(f"{prefix}/jobs", include_in_schema=False)
    async def jobs_page(request: Request) -> HTMLResponse:
        return _render(request, "jobs.html", "Jobs", "jobs")

    @app.get(f"{prefix}/jobs/{{job_id}}", include_in_schema=False)
    async def job_page(
        request: Request, job_id: Annotated[str, Path(max_length=40, pattern=r"^[A-Za-z0-9_-]+$")]
    ) -> HTMLResponse:
        # The id only names what the page fetches; whether it is this tenant's job is the API's answer.
        return _render(request, "job.html", f"Job {job_id}", "jobs", job_id=job_id)

    @app.get(f"{prefix}/adapters", include_in_schema=False)
    async def adapters_page(request: Request) -> HTMLResponse:
        return _render(request, "adapters.html", "Adapters", "adapters")

    @app.get(f"{prefix}/playground", include_in_schema=False)
    async def playground_page(request: Request) -> HTMLResponse:
        return _render(request, "playground.html", "Playground", "playground")
