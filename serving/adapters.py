"""Adapters at run time: look the name up in SQL, verify the files, validate, load into vLLM once per name."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
from core.errors import InvalidInput, NotFound, redact_paths
from core.models import AdapterStatus
from core.repository import adapters as adapters_repo
from core.settings import Settings
from core.storage import Store, sha256_file
from serving import metrics

log = logging.getLogger(__name__)


class AdapterRejected(InvalidInput):
    """An adapter that cannot be served, with the reason; other adapters are unaffected."""

    code = "adapter_not_servable"

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"adapter {name!r} cannot be served: {reason}", param="adapter")
        self.reason = reason


@dataclass(frozen=True)
class AdapterFiles:
    name: str
    path: Path


class AdapterRegistry:
    """Names -> loaded LoRARequests, with a stable int id per name for the process lifetime.

    An id is handed out once and never reused for another name, and names are unique in SQL (a deleted
    name stays taken), so an id always means the same weights. vLLM may evict a loaded adapter from its
    LRU cache and reload it later from the same, already verified, directory.
    """

    def __init__(
        self,
        settings: Settings,
        add_lora: Callable[[Any], Awaitable[bool]],
        remove_lora: Callable[[int], Awaitable[bool]],
    ) -> None:
        self._settings = settings
        self._store = Store(settings)
        self._add_lora = add_lora
        self._remove_lora = remove_lora
        self._base_shapes = base_weight_shapes(settings.base_model)
        self._ids: dict[str, int] = {}
        self._next_id = itertools.count(1)
        self._loaded: dict[str, Any] = {}
        self._deleted: set[str] = set()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @property
    def loaded_names(self) -> list[str]:
        return sorted(self._loaded)

    async def lora_request(self, name: str) -> Any:
        """The LoRARequest for `name`, loading it on first use (concurrent first requests load it once)."""
        request = self._loaded.get(name)
        if request is not None:
            return request
        async with self._locks[name]:
            request = self._loaded.get(name)
            if request is not None:
                return request
            if name in self._deleted:
                raise NotFound(f"no adapter named {name!r}", param="adapter")
            started = time.monotonic()
            try:
                files = await asyncio.to_thread(self._verified_files, name)
            except AdapterRejected:
                metrics.record_adapter_load_failure("rejected")
                raise
            request = self._new_request(files)
            try:
                await self._add_lora(request)
            except Exception as e:
                log.warning("vLLM could not load adapter %s", name, exc_info=True)
                metrics.record_adapter_load_failure("engine")
                raise AdapterRejected(name, f"the engine could not load it: {_first_line(e)}") from e
            metrics.record_adapter_loaded(time.monotonic() - started)
            self._loaded[name] = request
            log.info("loaded adapter %s as lora id %d", name, request.lora_int_id)
            return request

    async def unload(self, name: str) -> bool:
        """Forget the adapter for good (it was deleted) and drop it from the engine."""
        async with self._locks[name]:
            self._deleted.add(name)
            request = self._loaded.pop(name, None)
            if request is None:
                return False
            await self._remove_lora(request.lora_int_id)
            return True

    def _new_request(self, files: AdapterFiles) -> Any:
        from vllm.lora.request import LoRARequest

        lora_id = self._ids.get(files.name)
        if lora_id is None:
            lora_id = self._ids[files.name] = next(self._next_id)
        return LoRARequest(lora_name=files.name, lora_int_id=lora_id, lora_path=str(files.path))

    def _verified_files(self, name: str) -> AdapterFiles:
        """Look the adapter up in SQL, check every file's sha256 against the row, validate config and shapes."""
        with session_scope(self._settings.database_url) as session:
            row = adapters_repo.get_adapter_by_name(session, name)
            if row is None or row.status == AdapterStatus.deleted:
                raise NotFound(f"no adapter named {name!r}", param="adapter")
            if row.status != AdapterStatus.ready or not row.servable:
                raise AdapterRejected(name, row.servable_reason or f"its status is {row.status.value}")
            if row.base_model not in (self._settings.served_model_name, self._settings.base_model):
                raise AdapterRejected(name, f"it was made for base model {row.base_model!r}, not this server's")
            relative, expected = row.path, dict(row.files)
        path = self._store.resolve(relative)
        if ADAPTER_CONFIG not in expected or ADAPTER_WEIGHTS not in expected:
            raise AdapterRejected(name, f"it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (safetensors only)")
        for file_name, digest in expected.items():
            file = self._store.resolve(f"{relative}/{file_name}")
            if not file.is_relative_to(path) or not file.is_file():
                raise AdapterRejected(name, f"file {file_name} is missing")
            if sha256_file(file) != digest:
                raise AdapterRejected(name, f"file {file_name} does not match its recorded sha256")
        unexpected = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - set(expected)
        if unexpected:
            raise AdapterRejected(name, f"files not recorded for it: {sorted(unexpected)}")
        try:
            config = json.loads((path / ADAPTER_CONFIG).read_text())
            check_adapter_config(config, max_rank=self._settings.max_lora_rank)
            weights = safetensors_shapes(path / ADAPTER_WEIGHTS)
            check_adapter_shapes(weights, self._base_shapes, max_rank=self._settings.max_lora_rank)
        except (ValueError, KeyError, TypeError) as e:
            raise AdapterRejected(name, str(e)) from e
        return AdapterFiles(name=name, path=path)


def _first_line(e: BaseException) -> str:
    """The engine's reason, for the client: its first line, without the server's paths (redact_paths)."""
    text = str(e).strip() or type(e).__name__
    return redact_paths(text.splitlines()[0])[:500]
