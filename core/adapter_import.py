"""Adapters from outside: unpack an uploaded archive safely and check it before anything is recorded.

Refused, with a 422 naming the archive member: absolute paths, `..`, links (symbolic or hard), devices,
pickle files anywhere in the archive (loading one can run code), a missing or invalid adapter_config.json,
weights that are not safetensors or do not fit the base model, and an adapter made for another base model.
Only adapter_config.json and adapter_model.safetensors are kept; other members (a README, tokenizer files)
are skipped.

An archive is hostile input, so unpacking it costs bounded time and memory (413 naming the setting past any
bound): members are read one by one (never a whole listing first) up to max_archive_members and
max_archive_header_bytes of headers; the sizes members declare and the bytes actually decompressed are counted
against max_adapter_upload_bytes as they are read, so a member that lies about its size cannot pass it and a
gzip / bz2 / xz stream of zeros is not decompressed past it; and the whole unpack runs in a child process
(`python -m core.adapter_import`) with an address-space limit (adapter_unpack_memory_bytes) and a CPU and wall
clock limit (adapter_unpack_timeout_seconds).
"""

from __future__ import annotations

import functools
import json
import lzma
import math
import os
import resource
import signal
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from core import strict_json
from core.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterConfigKeyError,
    base_weight_shapes,
    check_adapter_shapes,
    safetensors_shapes,
    sanitized_adapter_config,
)
from core.errors import InvalidInput, PayloadTooLarge, TuneserveError, redact_paths

if TYPE_CHECKING:  # not imported at run time: the unpacking child stays small (its address space is limited)
    from core.settings import Settings

KEPT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# Formats that torch.load / pickle would open; none is ever unpacked.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
CHUNK = 1 << 20


class ArchiveRefused(InvalidInput):
    code = "invalid_adapter_archive"

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message, param=f"file:{member}" if member else "file")


class ArchiveTooLarge(PayloadTooLarge):
    """Past one of the unpacking bounds; the message names the setting."""

    def __init__(self, message: str, setting: str, member: str | None = None) -> None:
        super().__init__(f"{message} (TUNESERVE_{setting.upper()})", param=f"file:{member}" if member else "file")


@dataclass(frozen=True)
class UnpackLimits:
    """The bounds of one unpack, from the settings (sent to the child as JSON)."""

    max_bytes: int
    max_members: int
    max_header_bytes: int
    max_config_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> UnpackLimits:
        return cls(
            max_bytes=settings.max_adapter_upload_bytes,
            max_members=settings.max_archive_members,
            max_header_bytes=settings.max_archive_header_bytes,
            max_config_bytes=settings.max_adapter_config_bytes,
        )


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


class _Tally:
    """Members, header bytes and declared sizes seen so far, each refused as soon as it passes its bound."""

    def __init__(self, limits: UnpackLimits) -> None:
        self.limits = limits
        self.members = self.header_bytes = self.declared = 0

    def add(self, name: str, *, header_bytes: int, size: int) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveTooLarge(f"the archive has more than {self.limits.max_members} members", "max_archive_members")
        self.header_bytes += header_bytes
        if self.header_bytes > self.limits.max_header_bytes:
            raise ArchiveTooLarge(
                f"the archive's member headers pass {self.limits.max_header_bytes} bytes", "max_archive_header_bytes"
            )
        self.declared += max(size, 0)
        if self.declared > self.limits.max_bytes:
            raise ArchiveTooLarge(
                f"the archive's members declare more than {self.limits.max_bytes} bytes unpacked",
                "max_adapter_upload_bytes",
                name,
            )


def _tar_members(archive: tarfile.TarFile, tally: _Tally) -> Iterator[tuple[str, str, Callable[[], IO[bytes]]]]:
    # next(), not getmembers(): one header at a time, and never past a member whose declared size is over budget
    # (moving to the next header of a compressed tar decompresses the data in between).
    while (info := archive.next()) is not None:
        tally.add(info.name, header_bytes=info.offset_data - info.offset, size=info.size if info.isfile() else 0)
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


def _zip_directory_bounds(path: Path, limits: UnpackLimits) -> None:
    """Refuse a zip by its end-of-central-directory record, before zipfile reads the whole directory into memory."""
    read_end = getattr(zipfile, "_EndRecData", None)  # the stdlib's own EOCD (and zip64) reader
    if read_end is None:  # a Python without it: the child's memory and time limits still bound the listing
        return
    with path.open("rb") as f:
        end = read_end(f)
    if end is None:
        raise ArchiveRefused("file is not a .tar, .tar.gz or .zip archive")
    entries, directory_bytes = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if entries > limits.max_members:
        raise ArchiveTooLarge(
            f"the archive has {entries} members; the limit is {limits.max_members}", "max_archive_members"
        )
    if directory_bytes > limits.max_header_bytes:
        raise ArchiveTooLarge(
            f"the archive's central directory is {directory_bytes} bytes; the limit is {limits.max_header_bytes}",
            "max_archive_header_bytes",
        )


def _zip_members(archive: zipfile.ZipFile, tally: _Tally) -> Iterator[tuple[str, str, Callable[[], IO[bytes]]]]:
    for info in archive.infolist():  # bounded: _zip_directory_bounds checked the directory first
        tally.add(info.filename, header_bytes=0, size=info.file_size)
        mode = info.external_attr >> 16
        if mode & ZIP_FILE_TYPE == ZIP_SYMLINK:
            kind = "link"
        elif info.is_dir():
            kind = "dir"
        else:
            kind = "file"
        yield info.filename, kind, functools.partial(archive.open, info)


@contextmanager
def open_archive(path: Path, limits: UnpackLimits) -> Iterator[list[Member]]:
    """The members of a .tar, .tar.gz / .tgz or .zip archive (detected from its bytes, not its name)."""
    tally = _Tally(limits)
    if zipfile.is_zipfile(path):
        _zip_directory_bounds(path, limits)
        with zipfile.ZipFile(path) as archive:
            yield _checked(_zip_members(archive, tally))
        return
    try:
        tar = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError):
        raise ArchiveRefused("file is not a .tar, .tar.gz or .zip archive") from None
    with tar:
        yield _checked(_tar_members(tar, tally))


def _safe_name(name: str) -> str:
    """The member's normalized relative path; refuses what could land outside the target directory."""
    if "\\" in name or "\x00" in name:
        raise ArchiveRefused(f"member {name!r:.300} has a backslash or NUL in its path", name[:300])
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise ArchiveRefused(f"member {name!r:.300} points outside the archive (absolute path or '..')", name[:300])
    return path.as_posix().removeprefix("./")


def _checked(raw: Iterator[tuple[str, str, Callable[[], IO[bytes]]]]) -> list[Member]:
    members = []
    for name, kind, opener in raw:
        safe = _safe_name(name)
        if kind == "link":
            raise ArchiveRefused(f"member {name!r:.300} is a link; links are refused", name[:300])
        if kind == "special":
            raise ArchiveRefused(f"member {name!r:.300} is a device or fifo; only files are accepted", name[:300])
        if safe.lower().endswith(PICKLE_SUFFIXES):
            raise ArchiveRefused(
                f"member {name!r:.300} is a pickle file (loading one can run code); adapters are imported as "
                f"{ADAPTER_WEIGHTS} (safetensors) only",
                name[:300],
            )
        members.append(Member(name=safe, is_file=kind == "file", open=opener))
    return members


def _adapter_root(members: list[Member]) -> str:
    """The directory holding adapter_config.json: the archive's root or one folder (`my-adapter/...`)."""
    configs = [m.name for m in members if m.is_file and PurePosixPath(m.name).name == ADAPTER_CONFIG]
    if not configs:
        raise ArchiveRefused(f"the archive has no {ADAPTER_CONFIG}")
    if len(configs) > 1:
        raise ArchiveRefused(f"the archive holds more than one adapter ({', '.join(sorted(configs))[:1000]})")
    parent = PurePosixPath(configs[0]).parent
    if len(parent.parts) > 1:
        raise ArchiveRefused(f"{configs[0]}: put the adapter at the archive's root or in one folder", configs[0])
    return "" if parent == PurePosixPath(".") else f"{parent.as_posix()}/"


def _copy_limited(source: IO[bytes], target: Path, *, budget: int, member: str, setting: str) -> int:
    """Copy, counting decompressed bytes as they are read: refused as soon as they pass the budget."""
    written = 0
    with target.open("wb") as out:
        while chunk := source.read(min(CHUNK, budget + 1 - written)):
            written += len(chunk)
            if written > budget:
                raise ArchiveTooLarge(f"member {member!r} unpacks past the limit of {budget} bytes", setting, member)
            out.write(chunk)
    return written


# What the unpacking child inherits: enough to start Python and import this package; no TUNESERVE_ setting (the
# database URL with its password, the tokens), no cloud credentials, nothing else of the API's environment.
CHILD_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "VIRTUAL_ENV")


def unpack_child_env() -> dict[str, str]:
    """The unpacking child's whole environment."""
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {key: os.environ[key] for key in CHILD_ENV_KEYS if key in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env["PYTHONNOUSERSITE"] = "1"
    return env


def unpack_adapter(archive: Path, target: Path, settings: Settings) -> None:
    """Write the archive's adapter_config.json and adapter_model.safetensors into target (nothing else), in a
    child process limited in memory and time; its refusals come back as the same 413 / 422."""
    limits = UnpackLimits.of(settings)
    timeout = settings.adapter_unpack_timeout_seconds
    command = [
        sys.executable,
        "-m",
        "core.adapter_import",
        str(archive),
        str(target),
        json.dumps(asdict(limits)),
        str(timeout),
        str(settings.adapter_unpack_memory_bytes),
    ]
    too_slow = ArchiveTooLarge(
        f"unpacking the archive took longer than {timeout:g} s", "adapter_unpack_timeout_seconds"
    )
    try:
        done = subprocess.run(
            command, capture_output=True, timeout=timeout, env=unpack_child_env(), cwd=target, check=False
        )
    except subprocess.TimeoutExpired:
        raise too_slow from None
    if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        raise too_slow
    if done.returncode in (-signal.SIGXFSZ,):
        raise ArchiveTooLarge(f"the archive unpacks past {limits.max_bytes} bytes", "max_adapter_upload_bytes")
    try:
        outcome = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"the unpacking child failed ({done.returncode}): {done.stderr.decode()[-2000:]}") from None
    if outcome.get("error"):
        error = outcome["error"]
        cls = PayloadTooLarge if outcome["status"] == 413 else InvalidInput
        raise cls(error["message"], param=error["param"], code=error["code"])


def _unpack(archive: Path, target: Path, limits: UnpackLimits) -> None:
    try:
        _unpack_members(archive, target, limits)
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        EOFError,
        RuntimeError,
        OSError,
        zlib.error,
        lzma.LZMAError,
        ValueError,
        NotImplementedError,
    ) as e:
        # Truncated or corrupt data, an encrypted zip, an unsupported compression method.
        raise ArchiveRefused(f"the archive cannot be read: {type(e).__name__}: {redact_paths(str(e))[:500]}") from None


def _unpack_members(archive: Path, target: Path, limits: UnpackLimits) -> None:
    with open_archive(archive, limits) as members:
        root = _adapter_root(members)
        by_name = {m.name: m for m in members if m.is_file}
        budget = limits.max_bytes
        for kept in KEPT_FILES:
            member = by_name.get(root + kept)
            if member is None:
                other = next((m.name for m in members if m.name.startswith(root) and "model" in m.name), None)
                hint = f" (found {other!r}; safetensors only)" if other else ""
                raise ArchiveRefused(f"the archive has no {root + kept}{hint}", root + kept)
            cap, setting = budget, "max_adapter_upload_bytes"
            if kept == ADAPTER_CONFIG and limits.max_config_bytes < budget:
                cap, setting = limits.max_config_bytes, "max_adapter_config_bytes"
            with member.open() as source:
                budget -= _copy_limited(source, target / kept, budget=cap, member=member.name, setting=setting)


def _limit_self(timeout: float, memory_bytes: int, file_bytes: int) -> None:
    """Run in the child before it reads a byte of the archive."""
    cpu = max(1, math.ceil(timeout))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _child_main(argv: list[str]) -> int:
    archive, target, limits_json, timeout, memory = argv
    limits = UnpackLimits(**json.loads(limits_json))
    _limit_self(float(timeout), int(memory), limits.max_bytes + CHUNK)
    try:
        _unpack(Path(archive), Path(target), limits)
        outcome: dict[str, Any] = {"error": None}
    except TuneserveError as e:
        outcome = {"status": e.status_code, **e.to_dict()}
    except MemoryError:
        error: TuneserveError = ArchiveTooLarge(
            f"unpacking the archive needs more than {int(memory)} bytes of memory", "adapter_unpack_memory_bytes"
        )
        outcome = {"status": error.status_code, **error.to_dict()}
    except RecursionError:
        error = ArchiveRefused("the archive cannot be read: nested too deeply")
        outcome = {"status": error.status_code, **error.to_dict()}
    print(json.dumps(outcome), flush=True)  # noqa: T201 - the child's one answer to its parent, on stdout
    return 0


def _matches_base(declared: Any, settings: Settings) -> bool:
    if not declared:
        return True  # not every exporter records it; the tensor shapes decide then
    ours = {settings.base_model, settings.served_model_name, PurePosixPath(settings.base_model).name}
    return str(declared) in ours or PurePosixPath(str(declared)).name in ours


def check_unpacked(directory: Path, settings: Settings) -> ImportedAdapter:
    """Validate the unpacked config and weights against what this deployment serves; 422 naming the file."""
    config_param = f"file:{ADAPTER_CONFIG}"
    try:  # its size was capped (max_adapter_config_bytes) when it was unpacked
        config = strict_json.loads((directory / ADAPTER_CONFIG).read_bytes())
    except ValueError as e:  # JSONDecodeError (NaN / Infinity and deep nesting included), UnicodeDecodeError
        raise ArchiveRefused(f"{ADAPTER_CONFIG} is not valid JSON: {e}", ADAPTER_CONFIG) from None
    if not isinstance(config, dict):
        raise ArchiveRefused(f"{ADAPTER_CONFIG} must be a JSON object", ADAPTER_CONFIG)
    try:
        clean = sanitized_adapter_config(config, max_rank=settings.max_lora_rank)
    except AdapterConfigKeyError as e:
        raise InvalidInput(f"{ADAPTER_CONFIG}: {e}", param=f"{config_param}:{e.key}", code="invalid_adapter") from None
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"{ADAPTER_CONFIG}: {e}", param=config_param, code="invalid_adapter") from None
    declared = config.get("base_model_name_or_path")
    if not _matches_base(declared, settings):
        raise InvalidInput(
            f"{ADAPTER_CONFIG}: the adapter was made for base model {declared!r:.200}; this deployment serves "
            f"{settings.served_model_name!r}",
            param=f"{config_param}:base_model_name_or_path",
            code="wrong_base_model",
        )
    try:
        weights = safetensors_shapes(
            directory / ADAPTER_WEIGHTS, max_header_bytes=settings.max_safetensors_header_bytes
        )
        check_adapter_shapes(weights, base_weight_shapes(settings.base_model), max_rank=settings.max_lora_rank)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{ADAPTER_WEIGHTS}: {e}", param=f"file:{ADAPTER_WEIGHTS}", code="invalid_adapter") from None
    # Stored (and later read by PEFT and vLLM) rewritten from the allowlist, never as uploaded.
    (directory / ADAPTER_CONFIG).write_text(json.dumps(clean, indent=2) + "\n")
    targets = config.get("target_modules") or []
    return ImportedAdapter(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]) if config.get("lora_alpha") is not None else None,
        target_modules=[targets] if isinstance(targets, str) else sorted(str(t) for t in targets),
    )


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
