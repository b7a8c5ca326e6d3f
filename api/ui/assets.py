"""Where the console's and the docs' files are, and the vendored versions (api/ui/static/vendor/README.md)."""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
CONSOLE_PREFIX = "/ui"
STATIC_PREFIX = f"{CONSOLE_PREFIX}/static"

# Pinned npm packages, vendored unmodified (no CDN: the console and /docs work on a machine without a network).
ALPINE_JS = f"{STATIC_PREFIX}/vendor/alpinejs-3.17.5/alpine.min.js"
UPLOT_JS = f"{STATIC_PREFIX}/vendor/uplot-1.6.32/uPlot.iife.min.js"
UPLOT_CSS = f"{STATIC_PREFIX}/vendor/uplot-1.6.32/uPlot.min.css"
SWAGGER_JS = f"{STATIC_PREFIX}/vendor/swagger-ui-dist-5.35.0/swagger-ui-bundle.js"
SWAGGER_CSS = f"{STATIC_PREFIX}/vendor/swagger-ui-dist-5.35.0/swagger-ui.css"
SWAGGER_FAVICON = f"{STATIC_PREFIX}/vendor/swagger-ui-dist-5.35.0/favicon-32x32.png"
