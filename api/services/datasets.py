"""Dataset upload: read within the size limit, validate every line, split, store atomically, then record."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from fastapi import UploadFile
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.services import usage as usage_service
from api.services.idempotency import claim_key, earlier_resource, idempotent_request
from core.dataset_formats import (
    OBJECTIVES_BY_FORMAT,
    DatasetLineError,
    dump_jsonl,
    parse_jsonl,
    row_stats,
    split_rows,
)
from core.errors import InvalidInput, NotFound, PayloadTooLarge
from core.models import Dataset, new_id
from core.repository import datasets as datasets_repo
from core.settings import Settings
from core.storage import Store

CHUNK = 1 << 16
# The upload as it came, beside the normalised splits, for datasets made through /v1/files.
ORIGINAL_FILE = "original.jsonl"


@dataclass(frozen=True)
class UploadOptions:
    test_fraction: float | None
    seed: int


async def read_limited(upload: UploadFile, *, limit: int, param: str) -> bytes:
    """The upload's bytes, refused with 413 as soon as they pass the limit."""
    parts: list[bytes] = []
    total = 0
    while chunk := await upload.read(CHUNK):
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"{param} is larger than the limit of {limit} bytes", param=param)
        parts.append(chunk)
    return b"".join(parts)


def _parse(data: bytes, *, split: str, settings: Settings):  # type: ignore[no-untyped-def]
    try:
        return parse_jsonl(
            data,
            split=split,
            max_rows=settings.max_dataset_rows,
            max_line_bytes=settings.max_line_bytes,
            max_messages=settings.max_messages_per_row,
            max_chars=settings.max_chars_per_row,
        )
    except DatasetLineError as e:
        param = "test_file" if split == "test" else "file"
        where = f"line {e.line}" if e.line else "file"
        raise InvalidInput(
            e.message if e.message.startswith(where) else f"{where}: {e.message}",
            param=f"{param}:{e.line}:{e.field}" if e.line else f"{param}:{e.field}",
            code="invalid_dataset",
        ) from None


@dataclass(frozen=True)
class Upload:
    """A dataset upload read into memory (within max_upload_bytes)."""

    filename: str
    train: bytes
    test_filename: str | None
    test: bytes | None
    options: UploadOptions
    # /v1/files promises the exact bytes back (GET /v1/files/{id}/content); native uploads keep only the parsed rows.
    keep_original: bool = False

    def identity(self) -> dict[str, object]:
        """What makes two uploads the same request (for Idempotency-Key): the files' names and bytes, the form fields."""

        def part(name: str | None, data: bytes | None) -> dict[str, str] | None:
            return None if data is None else {"filename": name or "", "sha256": hashlib.sha256(data).hexdigest()}

        return {
            "file": part(self.filename, self.train),
            "test_file": part(self.test_filename, self.test),
            "test_fraction": self.options.test_fraction,
            "seed": self.options.seed,
        }


async def create_dataset(
    session: Session,
    settings: Settings,
    tenant_id: str,
    *,
    file: UploadFile,
    test_file: UploadFile | None,
    options: UploadOptions,
    idempotency_key: str | None = None,
) -> tuple[Dataset, bool]:
    """Read the upload, then validate and store it off the event loop; returns the dataset and whether it is a replay."""
    if options.test_fraction is not None and test_file is not None:
        raise InvalidInput("give either test_file or test_fraction, not both", param="test_fraction")
    # A tenant already at its storage quota is refused before the upload is read (admit() decides, after the insert).
    await run_in_threadpool(usage_service.check_room, session, settings, tenant_id, "dataset")
    train_bytes = await read_limited(file, limit=settings.max_upload_bytes, param="file")
    test_bytes = None
    if test_file is not None:
        test_bytes = await read_limited(
            test_file, limit=settings.max_upload_bytes - len(train_bytes), param="test_file"
        )
    upload = Upload(
        filename=file.filename or "upload.jsonl",
        train=train_bytes,
        test_filename=test_file.filename if test_file is not None else None,
        test=test_bytes,
        options=options,
    )
    # Parsing a big file and the SQL (which may wait on a lock) must not block the event loop.
    return await run_in_threadpool(store_dataset, session, settings, tenant_id, upload, idempotency_key)


def store_dataset(
    session: Session, settings: Settings, tenant_id: str, upload: Upload, idempotency_key: str | None
) -> tuple[Dataset, bool]:
    """Validate every line, split, claim the Idempotency-Key, store the files atomically, then record."""
    idempotency = idempotent_request(
        tenant_id,
        "POST /datasets",
        idempotency_key,
        upload.identity(),
        ttl_seconds=settings.idempotency_key_ttl_seconds,
    )
    if idempotency is not None and (earlier := earlier_resource(session, idempotency)):
        return get_dataset_or_404(session, tenant_id, earlier), True
    options = upload.options
    train = _parse(upload.train, split="train", settings=settings)
    test_rows: list[Any] = []
    split_source = "none"
    if upload.test is not None:
        test = _parse(upload.test, split="test", settings=settings)
        if test.format.kind != train.format.kind:
            # A preference test split scores preference accuracy against pairs; another kind cannot stand in for it.
            raise InvalidInput(
                f"test_file holds {test.format.value} rows and file holds {train.format.value} rows; a test split "
                "must hold the same kind of rows (supervised, preference pairs or unpaired)",
                param="test_file",
                code="invalid_dataset",
            )
        test_rows, split_source = test.rows, "file"
    train_rows = train.rows
    if options.test_fraction is not None:
        try:
            train_rows, test_rows = split_rows(train.rows, test_fraction=options.test_fraction, seed=options.seed)
        except ValueError as e:
            raise InvalidInput(str(e), param="test_fraction") from None
        split_source = "fraction"

    test_bytes = upload.test or b""
    digest = hashlib.sha256(upload.train + test_bytes).hexdigest()
    dataset_id = new_id("ds")
    # Before any file is written: a concurrent duplicate stops here and leaves nothing behind.
    if idempotency is not None and (winner := claim_key(session, idempotency, dataset_id)):
        return get_dataset_or_404(session, tenant_id, winner), True
    store = Store(settings)
    relative = store.dataset_dir(dataset_id)
    with store.staging_dir() as staged:
        (staged / "train.jsonl").write_bytes(dump_jsonl(train_rows))
        if test_rows:
            (staged / "test.jsonl").write_bytes(dump_jsonl(test_rows))
        if upload.keep_original:
            (staged / ORIGINAL_FILE).write_bytes(upload.train)
        store.publish(staged, relative)

    stats = {"train": row_stats(train_rows), "test": row_stats(test_rows) if test_rows else None}
    dataset = datasets_repo.add_dataset(
        session,
        Dataset(
            id=dataset_id,
            tenant_id=tenant_id,
            filename=upload.filename.replace("\x00", "")[:255],  # Postgres text cannot hold NUL
            format=train.format.value,
            train_rows=len(train_rows),
            test_rows=len(test_rows),
            split_source=split_source,
            test_fraction=options.test_fraction,
            split_seed=options.seed if split_source == "fraction" else None,
            path=relative,
            sha256=digest,
            bytes=len(upload.train) + len(test_bytes),
            stats=stats,
            objectives=list(OBJECTIVES_BY_FORMAT[train.format.value]),
        ),
    )
    try:
        usage_service.admit(session, settings, tenant_id, "dataset", new_bytes=dataset.bytes)  # 413 past the quota
    except Exception:
        store.remove(relative)  # the rollback drops the row; the files go too
        raise
    return dataset, False


def get_dataset_or_404(session: Session, tenant_id: str, dataset_id: str, *, param: str = "dataset_id") -> Dataset:
    dataset = datasets_repo.get_owned_dataset(session, tenant_id, dataset_id)
    if dataset is None:
        raise NotFound(f"no dataset with id {dataset_id!r}", param=param)
    return dataset
