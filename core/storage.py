"""The file store: every path is built here, inside the store root, from ids and names (never from user paths)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.settings import Settings

ADAPTER_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.:-]{0,127}$")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_dir(path: Path) -> tuple[dict[str, str], int]:
    """sha256 of every file under path (relative names) and their total size."""
    files: dict[str, str] = {}
    total = 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        files[file.relative_to(path).as_posix()] = sha256_file(file)
        total += file.stat().st_size
    return files, total


class Store:
    def __init__(self, settings: Settings) -> None:
        self.root = settings.store

    def resolve(self, relative: str) -> Path:
        """A stored relative path made absolute, refusing anything that escapes the store."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"path escapes the store: {relative!r}")
        return path

    def dataset_dir(self, dataset_id: str) -> str:
        return f"datasets/{dataset_id}"

    def adapter_dir(self, adapter_name: str) -> str:
        if not ADAPTER_NAME_RE.match(adapter_name):
            raise ValueError(f"not a valid adapter name: {adapter_name!r}")
        # ':' is legal in names (OpenAI style) but not in every filesystem or URL path.
        return f"adapters/{adapter_name.replace(':', '__')}"

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    @contextmanager
    def staging_dir(self) -> Iterator[Path]:
        """A temp dir on the same filesystem as the store, removed unless it was moved away."""
        tmp = self.root / "tmp" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, staged: Path, relative: str, *, replace_unregistered: bool = False) -> Path:
        """Atomically move a fully written staging dir to its final place.

        An existing target is an error, unless the caller has made sure no row points at it (under the record's
        lease, see worker.publishing) and says so with replace_unregistered: a registered directory is never
        deleted or replaced.
        """
        final = self.resolve(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            if not replace_unregistered:
                raise FileExistsError(f"{relative} is already published")
            shutil.rmtree(final)
        os.rename(staged, final)
        return final

    def remove(self, relative: str) -> bool:
        """Delete a published directory (an unregistered leftover, or a deleted resource's files)."""
        path = self.resolve(relative)
        if path == self.root or not path.exists():
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
