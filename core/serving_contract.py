"""What the API and serving agree on over HTTP (serving is vLLM's own OpenAI server plus tuneserve's guard).

Neither side imports the other: the API forwards OpenAI bodies to these paths, serving checks the token header.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from core.settings import Settings

TOKEN_HEADER = "X-Tuneserve-Serving-Token"
# The embedded mode's serving token, generated once per deployment in data_dir (mode 0600) when
# TUNESERVE_SERVING_TOKEN is unset; the API and serving on the same host both read it.
TOKEN_FILE = "serving.token"


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serving_token(settings: Settings) -> str:
    """The token the API sends and serving requires, never empty: serving answers nothing without it.

    TUNESERVE_SERVING_TOKEN when set (required when serving or a serving URL is beyond loopback, as in compose:
    a ValueError then, so the process fails at start). Otherwise one generated for this deployment in
    data_dir/serving.token, created atomically (the first of the API and serving to start writes it).
    """
    if settings.serving_token:
        return settings.serving_token
    hosts = [settings.serving_host, *(urlsplit(url).hostname or "" for url in settings.serving_url_list)]
    beyond = [h for h in hosts if not is_loopback(h)]
    if beyond:
        raise ValueError(f"serving is reached beyond loopback ({beyond[0]!r}): set TUNESERVE_SERVING_TOKEN")
    path = Path(settings.data_dir) / TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(staged, path)  # atomic and never replaces: a concurrent starter's token wins, both read it
        except FileExistsError:
            pass
        finally:
            staged.unlink()
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty: delete it (a new token is generated) or set TUNESERVE_SERVING_TOKEN")
    return token


COMPLETIONS_PATH = "/v1/completions"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
# vLLM's runtime adapter endpoints (on with VLLM_ALLOW_RUNTIME_LORA_UPDATING, which the resolver needs). Loading by
# path is not in SERVING_PATHS (adapters come only from the registry, verified); unloading is, for the API's
# DELETE /adapters/{name}, behind the token like every serving path.
LOAD_LORA_PATH = "/v1/load_lora_adapter"
UNLOAD_LORA_PATH = "/v1/unload_lora_adapter"

# Everything serving answers; vLLM's server has more (load adapters by path, SageMaker's /adapters and
# /invocations, the Responses API's stored responses, elastic scaling), and serving's guard answers 404 to all of
# it, token or not: this list is what the API needs and what operators scrape.
SERVING_PATHS = frozenset(
    {HEALTH_PATH, METRICS_PATH, MODELS_PATH, COMPLETIONS_PATH, CHAT_COMPLETIONS_PATH, UNLOAD_LORA_PATH, "/version"}
)

# The resolver refuses an adapter that is registered but cannot be served with vLLM's 422 naming `model` and a
# message that starts with this; the API turns it into its own `adapter_not_servable`.
NOT_SERVABLE_PREFIX = "adapter_not_servable: "


def tenant_cache_salt(settings: Settings, tenant_id: str) -> str:
    """vLLM's `cache_salt` for a tenant: its prefix-cache entries are reachable by that tenant's requests only, so no
    tenant can time first tokens to learn another's prompts. Keyed with the serving token, so it is not guessable;
    64 hex characters (vLLM: at most 128, none of @ / \\ NUL)."""
    key = serving_token(settings).encode()
    return hmac.new(key, f"cache-salt:{tenant_id}".encode(), hashlib.sha256).hexdigest()
