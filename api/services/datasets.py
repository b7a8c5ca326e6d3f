"""Dataset upload: read within the size limit, validate every line, split, store atomically, then record."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fastapi import UploadFile
from sqlalchemy.orm import Session

from core.dataset_formats import DatasetLineError, dump_jsonl, parse_jsonl, row_stats, split_rows
from core.errors import InvalidInput, NotFound, PayloadTooLarge
from core.models import Dataset, new_id
from core.repository import datasets as datasets_repo
from core.settings import Settings
from core.storage import Store

CHUNK = 1 << 16


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
        return parse_jsonl(data, split=split, max_rows=settings.max_dataset_rows, max_line_bytes=settings.max_line_bytes)
    except DatasetLineError as e:
        param = "test_file" if split == "test" else "file"
        where = f"line {e.line}" if e.line else "file"
        raise InvalidInput(
            e.message if e.message.startswith(where) else f"{where}: {e.message}",
            param=f"{param}:{e.line}:{e.field}" if e.line else f"{param}:{e.field}",
            code="invalid_dataset",
        ) from None


async def create_dataset(
    session: Session,
    settings: Settings,
    *,
    file: UploadFile,
    test_file: UploadFile | None,
    options: UploadOptions,
) -> Dataset:
    if options.test_fraction is not None and test_file is not None:
        raise InvalidInput("give either test_file or test_fraction, not both", param="test_fraction")
    train_bytes = await read_limited(file, limit=settings.max_upload_bytes, param="file")
    test_bytes = b""
    if test_file is not None:
        test_bytes = await read_limited(test_file, limit=settings.max_upload_bytes - len(train_bytes), param="test_file")

    train = _parse(train_bytes, split="train", settings=settings)
    test_rows: list = []
    split_source = "none"
    if test_file is not None:
        test = _parse(test_bytes, split="test", settings=settings)
        test_rows, split_source = test.rows, "file"
    train_rows = train.rows
    if options.test_fraction is not None:
        try:
            train_rows, test_rows = split_rows(train.rows, test_fraction=options.test_fraction, seed=options.seed)
        except ValueError as e:
            raise InvalidInput(str(e), param="test_fraction") from None
        split_source = "fraction"

    digest = hashlib.sha256(train_bytes + test_bytes).hexdigest()
    dataset_id = new_id("ds")
    store = Store(settings)
    relative = store.dataset_dir(dataset_id)
    with store.staging_dir() as staged:
        (staged / "train.jsonl").write_bytes(dump_jsonl(train_rows))
        if test_rows:
            (staged / "test.jsonl").write_bytes(dump_jsonl(test_rows))
        store.publish(staged, relative)

    stats = {"train": row_stats(train_rows), "test": row_stats(test_rows) if test_rows else None}
    return datasets_repo.add_dataset(
        session,
        Dataset(
            id=dataset_id,
            filename=(file.filename or "upload.jsonl")[:255],
            format=train.format.value,
            train_rows=len(train_rows),
            test_rows=len(test_rows),
            split_source=split_source,
            test_fraction=options.test_fraction,
            split_seed=options.seed if split_source == "fraction" else None,
            path=relative,
            sha256=digest,
            bytes=len(train_bytes) + len(test_bytes),
            stats=stats,
        ),
    )


def get_dataset_or_404(session: Session, dataset_id: str, *, param: str = "dataset_id") -> Dataset:
    dataset = datasets_repo.get_dataset(session, dataset_id)
    if dataset is None:
        raise NotFound(f"no dataset with id {dataset_id!r}", param=param)
    return dataset
