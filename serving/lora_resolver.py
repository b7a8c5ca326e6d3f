"""The registry-backed LoRA resolver: vLLM's OpenAI server asks it for every adapter name it has not loaded.

Registered by the `vllm.general_plugins` entry point `tuneserve_lora_resolver` (pyproject.toml). vLLM consults
resolvers only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, which `python -m serving` sets. Given a name, it looks the
adapter up in SQL, builds its path inside the store, checks every recorded file's sha256, that no file is
unrecorded, and the config and weight shapes against the base model, and only then hands vLLM a LoRARequest. A
name it does not know is None (vLLM answers 404); a registered adapter that cannot be served raises vLLM's 422
naming `model`, with the reason, which the API passes on as `adapter_not_servable`.

Names are unique in SQL and never reused (a deleted name stays taken), so a name vLLM has cached always means the
same verified weights; `DELETE /adapters/{name}` unloads it from every replica (UNLOAD_LORA_PATH).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from functools import cached_property
from pathlib import Path
from typing import Any

from core.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    base_weight_shapes,
    check_adapter_config,
    check_adapter_shapes,
    safetensors_shapes,
)
from core.db import session_scope
from core.models import AdapterStatus
from core.repository import adapters as adapters_repo
from core.serving_contract import NOT_SERVABLE_PREFIX
from core.settings import Settings, get_settings
from core.storage import Store, sha256_file
from serving import metrics

log = logging.getLogger(__name__)


class AdapterRefused(Exception):
    """A registered adapter that cannot be served; `reason` is a short fixed word for the metrics."""

    def __init__(self, name: str, reason: str, detail: str) -> None:
        super().__init__(f"adapter {name!r} cannot be served: {detail}")
        self.reason = reason


class RegistryAdapters:
    """The verification itself, without vLLM: SQL row -> verified directory, or None, or AdapterRefused."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings)

    @cached_property
    def base_shapes(self) -> dict[str, list[int]]:
        return base_weight_shapes(self.settings.base_model)

    def verified_path(self, name: str) -> Path | None:
        s = self.settings
        with session_scope(s.database_url) as session:
            row = adapters_repo.get_adapter_by_name(session, name)
            if row is None or row.status == AdapterStatus.deleted:
                return None
            if row.status != AdapterStatus.ready or not row.servable:
                raise AdapterRefused(name, "not_ready", row.servable_reason or f"its status is {row.status.value}")
            if row.base_model not in (s.served_model_name, s.base_model):
                raise AdapterRefused(name, "base_model", f"it was made for base model {row.base_model!r}")
            relative, expected = row.path, dict(row.files)
        # The connection is back in the pool before any file is read (hashing can take a while).
        path = self.store.resolve(relative)
        if ADAPTER_CONFIG not in expected or ADAPTER_WEIGHTS not in expected:
            raise AdapterRefused(name, "missing_file", f"it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
        for file_name, digest in expected.items():
            file = self.store.resolve(f"{relative}/{file_name}")
            if not file.is_relative_to(path) or not file.is_file():
                raise AdapterRefused(name, "missing_file", f"file {file_name} is missing")
            if sha256_file(file) != digest:
                raise AdapterRefused(name, "sha256", f"file {file_name} does not match its recorded sha256")
        unexpected = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - set(expected)
        if unexpected:
            raise AdapterRefused(name, "extra_file", f"files not recorded for it: {sorted(unexpected)}")
        try:
            check_adapter_config(json.loads((path / ADAPTER_CONFIG).read_text()), max_rank=s.max_lora_rank)
        except (ValueError, KeyError, TypeError) as e:
            raise AdapterRefused(name, "config", str(e)) from e
        try:
            check_adapter_shapes(safetensors_shapes(path / ADAPTER_WEIGHTS), self.base_shapes, max_rank=s.max_lora_rank)
        except (ValueError, KeyError, TypeError) as e:
            raise AdapterRefused(name, "shapes", str(e)) from e
        return path


def _resolver_class() -> type:
    from vllm.exceptions import VLLMUnprocessableEntityError
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class TuneserveResolver(LoRAResolver):
        def __init__(self, adapters: RegistryAdapters) -> None:
            self.adapters = adapters

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            started = time.monotonic()
            try:
                # SQL and hashing block: off the server's event loop, which streams every other request.
                path = await asyncio.to_thread(self.adapters.verified_path, lora_name)
            except AdapterRefused as e:
                metrics.record_refusal(e.reason)
                log.warning("refused adapter %s (%s): %s", lora_name, e.reason, e)
                raise VLLMUnprocessableEntityError(f"{NOT_SERVABLE_PREFIX}{e}", parameter="model") from e
            finally:
                metrics.RESOLVE_SECONDS.observe(time.monotonic() - started)
            if path is None:
                metrics.ADAPTER_RESOLUTIONS.labels("not_found").inc()
                return None
            metrics.ADAPTER_RESOLUTIONS.labels("verified").inc()
            log.info("verified adapter %s for %s", lora_name, base_model_name)
            # vLLM replaces the id with its own unique one before loading.
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))

    return TuneserveResolver


def register() -> None:
    """The `vllm.general_plugins` hook: vLLM runs it in each of its processes; only the server asks resolvers.

    Resolvers are consulted only with runtime LoRA updating on (as `python -m serving` runs vLLM's server); elsewhere
    (vLLM used on its own, as bench scripts do) this registers nothing and reads no settings.
    """
    if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() not in ("1", "true"):
        return
    settings = get_settings()
    from vllm.lora.resolver import LoRAResolverRegistry

    if "tuneserve" not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver("tuneserve", _resolver_class()(RegistryAdapters(settings)))
