"""Adapters from outside: unpack an uploaded archive safely and check it before anything is recorded.

Refused, with a 422 naming the archive member: absolute paths, `..`, links (symbolic or hard), devices,
pickle files anywhere in the archive (loading one can run code), a missing or invalid adapter_config.json,
weights that are not safetensors or do not fit the base model, and an adapter made for another base model.
Only adapter_config.json and adapter_model.safetensors are kept; other members (a README, tokenizer files)
are skipped. Bytes are counted as they are copied, so a member that lies about its size cannot pass the limit.
"""

from __future__ import annotations

import json
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from core.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    base_weight_shapes,
    check_adapter_config,
    check_adapter_shapes,
    safetensors_shapes,
)
from core.errors import InvalidInput, PayloadTooLarge
from core.settings import Settings

KEPT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# Formats that torch.load / pickle would open; none is ever unpacked.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
CHUNK = 1 << 20


class ArchiveRefused(InvalidInput):
    code = "invalid_adapter_archive"

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message, param=f"file:{member}" if member else "file")


@dataclass(frozen=True)
class Member:
    name: str
    is_file: bool
    open: Callable[[], IO[bytes]]


@dataclass(frozen=True)
class ImportedAdapter:
    """What an unpacked, checked adapter holds (for its SQL row)."""

    rank: int
    alpha: float | None
    target_modules: list[str]


def _tar_members(archive: tarfile.TarFile) -> Iterator[tuple[str, str, Callable[[], IO[bytes]]]]:
    for info in archive.getmembers():
        if info.issym() or info.islnk():
            kind = "link"
        elif info.isdir():
            kind = "dir"
        elif info.isfile():
            kind = "file"
        else:
            kind = "special"  # devices, fifos

        def opener(info: tarfile.TarInfo = info) -> IO[bytes]:
            handle = archive.extractfile(info)
            assert handle is not None
            return handle

        yield info.name, kind, opener


ZIP_FILE_TYPE, ZIP_SYMLINK = 0o170000, 0o120000


def _zip_members(archive: zipfile.ZipFile) -> Iterator[tuple[str, str, Callable[[], IO[bytes]]]]:
    for info in archive.infolist():
        mode = info.external_attr >> 16
        if mode & ZIP_FILE_TYPE == ZIP_SYMLINK:
            kind = "link"
        elif info.is_dir():
            kind = "dir"
        else:
            kind = "file"
        yield info.filename, kind, lambda info=info: archive.open(info)


@contextmanager
def open_archive(path: Path) -> Iterator[list[Member]]:
    """The members of a .tar, .tar.gz / .tgz or .zip archive (detected from its bytes, not its name)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            yield _checked(_zip_members(archive))
        return
    try:
        archive = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError):
        raise ArchiveRefused("file is not a .tar, .tar.gz or .zip archive") from None
    with archive:
        yield _checked(_tar_members(archive))


def _safe_name(name: str) -> str:
    """The member's normalized relative path; refuses what could land outside the target directory."""
    if "\\" in name or "\x00" in name:
        raise ArchiveRefused(f"member {name!r} has a backslash or NUL in its path", name)
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise ArchiveRefused(f"member {name!r} points outside the archive (absolute path or '..')", name)
    return path.as_posix().removeprefix("./")


def _checked(raw: Iterator[tuple[str, str, Callable[[], IO[bytes]]]]) -> list[Member]:
    members = []
    for name, kind, opener in raw:
        safe = _safe_name(name)
        if kind == "link":
            raise ArchiveRefused(f"member {name!r} is a link; links are refused", name)
        if kind == "special":
            raise ArchiveRefused(f"member {name!r} is a device or fifo; only files are accepted", name)
        if safe.lower().endswith(PICKLE_SUFFIXES):
            raise ArchiveRefused(
                f"member {name!r} is a pickle file (loading one can run code); adapters are imported as "
                f"{ADAPTER_WEIGHTS} (safetensors) only",
                name,
            )
        members.append(Member(name=safe, is_file=kind == "file", open=opener))
    return members


def _adapter_root(members: list[Member]) -> str:
    """The directory holding adapter_config.json: the archive's root or one folder (`my-adapter/...`)."""
    configs = [m.name for m in members if m.is_file and PurePosixPath(m.name).name == ADAPTER_CONFIG]
    if not configs:
        raise ArchiveRefused(f"the archive has no {ADAPTER_CONFIG}")
    if len(configs) > 1:
        raise ArchiveRefused(f"the archive holds more than one adapter ({', '.join(sorted(configs))})")
    parent = PurePosixPath(configs[0]).parent
    if len(parent.parts) > 1:
        raise ArchiveRefused(f"{configs[0]}: put the adapter at the archive's root or in one folder", configs[0])
    return "" if parent == PurePosixPath(".") else f"{parent.as_posix()}/"


def _copy_limited(source: IO[bytes], target: Path, *, budget: int, member: str) -> int:
    written = 0
    with target.open("wb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > budget:
                raise PayloadTooLarge(f"member {member!r} unpacks past the limit", param=f"file:{member}")
            out.write(chunk)
    return written


def unpack_adapter(archive: Path, target: Path, *, max_bytes: int) -> None:
    """Write the archive's adapter_config.json and adapter_model.safetensors into target (nothing else)."""
    try:
        _unpack(archive, target, max_bytes=max_bytes)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, RuntimeError, OSError, zlib.error, lzma.LZMAError) as e:
        # Truncated or corrupt data, an encrypted zip, an unsupported compression method.
        raise ArchiveRefused(f"the archive cannot be read: {type(e).__name__}: {e}") from None


def _unpack(archive: Path, target: Path, *, max_bytes: int) -> None:
    with open_archive(archive) as members:
        root = _adapter_root(members)
        by_name = {m.name: m for m in members if m.is_file}
        budget = max_bytes
        for kept in KEPT_FILES:
            member = by_name.get(root + kept)
            if member is None:
                other = next((m.name for m in members if m.name.startswith(root) and "model" in m.name), None)
                hint = f" (found {other!r}; safetensors only)" if other else ""
                raise ArchiveRefused(f"the archive has no {root + kept}{hint}", root + kept)
            with member.open() as source:
                budget -= _copy_limited(source, target / kept, budget=budget, member=member.name)


def _matches_base(declared: Any, settings: Settings) -> bool:
    if not declared:
        return True  # not every exporter records it; the tensor shapes decide then
    ours = {settings.base_model, settings.served_model_name, PurePosixPath(settings.base_model).name}
    return str(declared) in ours or PurePosixPath(str(declared)).name in ours


def check_unpacked(directory: Path, settings: Settings) -> ImportedAdapter:
    """Validate the unpacked config and weights against what this deployment serves; 422 naming the file."""
    config_param = f"file:{ADAPTER_CONFIG}"
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArchiveRefused(f"{ADAPTER_CONFIG} is not valid JSON: {e}", ADAPTER_CONFIG) from None
    if not isinstance(config, dict):
        raise ArchiveRefused(f"{ADAPTER_CONFIG} must be a JSON object", ADAPTER_CONFIG)
    try:
        check_adapter_config(config, max_rank=settings.max_lora_rank)
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"{ADAPTER_CONFIG}: {e}", param=config_param, code="invalid_adapter") from None
    declared = config.get("base_model_name_or_path")
    if not _matches_base(declared, settings):
        raise InvalidInput(
            f"{ADAPTER_CONFIG}: the adapter was made for base model {declared!r}; this deployment serves "
            f"{settings.served_model_name!r}",
            param=f"{config_param}:base_model_name_or_path",
            code="wrong_base_model",
        )
    try:
        weights = safetensors_shapes(directory / ADAPTER_WEIGHTS)
        check_adapter_shapes(weights, base_weight_shapes(settings.base_model), max_rank=settings.max_lora_rank)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{ADAPTER_WEIGHTS}: {e}", param=f"file:{ADAPTER_WEIGHTS}", code="invalid_adapter") from None
    targets = config.get("target_modules") or []
    return ImportedAdapter(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]) if config.get("lora_alpha") is not None else None,
        target_modules=[targets] if isinstance(targets, str) else sorted(str(t) for t in targets),
    )
