"""The web console (/ui) and the API docs (/docs), both served from files shipped with the package.

The console's pages are static shells: every figure they show comes from the public JSON API, fetched by the
browser with the signed-in tenant's key (api/ui/static/js/console.js). Nothing under /ui reads the database, so it
needs no key (api/middleware.py: open prefixes) and can never show one tenant another's data.
"""

from api.ui.assets import STATIC_DIR, STATIC_PREFIX
from api.ui.docs import install_docs
from api.ui.pages import install_console

__all__ = ["STATIC_DIR", "STATIC_PREFIX", "install_console", "install_docs"]
