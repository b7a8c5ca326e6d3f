"""The OpenAI fine-tuning surface as a translation over the native services: a file is a dataset, a job is a job.

Nothing here validates, stores or trains on its own: ids and field names are mapped, the native services do the
work (the same parser, store, quotas and tenant checks), and refusals are re-worded in OpenAI's terms (400 with
`param`) where the native API would say 422.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import UploadFile
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.openai_schemas import FileObject
from api.schemas import unix
from api.services import datasets as datasets_service
from api.services import usage as usage_service
from core.errors import InvalidInput, NotFound, TuneserveError
from core.models import Dataset
from core.repository import datasets as datasets_repo
from core.settings import Settings
from core.storage import Store

FILE_PREFIX = "file-"
DATASET_PREFIX = "ds-"
# OpenAI's purposes; only fine-tune files are datasets (results files are made by jobs, never uploaded).
UPLOAD_PURPOSES = ("fine-tune",)


class BadRequest(TuneserveError):
    """OpenAI answers every refused request body with 400 (the client's BadRequestError), with `param`."""

    status_code = 400


def file_id(dataset_id: str) -> str:
    """ds-<hex> is file-<hex>: one row, two names, so a native dataset is a file and a file is a dataset."""
    return FILE_PREFIX + dataset_id.removeprefix(DATASET_PREFIX)


def dataset_id(file_id_: str) -> str | None:
    if not file_id_.startswith(FILE_PREFIX) or len(file_id_) > 40:
        return None
    return DATASET_PREFIX + file_id_.removeprefix(FILE_PREFIX)


def file_of(dataset: Dataset) -> FileObject:
    return FileObject(
        id=file_id(dataset.id),
        bytes=dataset.bytes,
        created_at=unix(dataset.created_at) or 0,
        filename=dataset.filename,
        purpose="fine-tune",
    )


def as_bad_request(e: InvalidInput) -> BadRequest:
    return BadRequest(e.message, param=e.param, code=e.code)


async def create_file(
    session: Session, settings: Settings, tenant_id: str, *, file: UploadFile, purpose: str
) -> Dataset:
    """Parse and store the upload as a dataset (keeping its bytes for /content); another purpose is a 400."""
    if purpose not in UPLOAD_PURPOSES:
        raise BadRequest(
            f"purpose {purpose!r} is not supported here: this deployment stores training data only "
            f"(purpose must be one of {', '.join(UPLOAD_PURPOSES)})",
            param="purpose",
            code="invalid_purpose",
        )
    await run_in_threadpool(usage_service.check_room, session, settings, tenant_id, "dataset")
    data = await datasets_service.read_limited(file, limit=settings.max_upload_bytes, param="file")
    upload = datasets_service.Upload(
        filename=file.filename or "upload.jsonl",
        train=data,
        test_filename=None,
        test=None,
        options=datasets_service.UploadOptions(test_fraction=None, seed=0),
        keep_original=True,
    )
    try:
        dataset, _ = await run_in_threadpool(datasets_service.store_dataset, session, settings, tenant_id, upload, None)
    except InvalidInput as e:
        raise as_bad_request(e) from None
    return dataset


def get_file_dataset(session: Session, tenant_id: str, file_id_: str, *, param: str = "file_id") -> Dataset:
    """The dataset behind a file id; unknown, malformed and another tenant's ids are all the same 404."""
    ident = dataset_id(file_id_)
    dataset = datasets_repo.get_owned_dataset(session, tenant_id, ident) if ident else None
    if dataset is None:
        raise NotFound(f"no file with id {file_id_!r}", param=param)
    return dataset


def list_files(
    session: Session, tenant_id: str, *, purpose: str | None, limit: int, after: str | None, order: str
) -> tuple[list[Dataset], bool]:
    if purpose is not None and purpose != "fine-tune":
        return [], False  # this deployment holds no file of any other purpose
    after_id = dataset_id(after) if after is not None else None
    return datasets_repo.list_datasets_ordered(
        session, tenant_id, limit=limit, after=after_id, ascending=order == "asc"
    )


def file_content_path(settings: Settings, dataset: Dataset) -> Path:
    """The bytes as uploaded; a dataset made through POST /datasets kept only its parsed train split, which is
    what a job trains on, so that is its content."""
    directory = Store(settings).resolve(dataset.path)
    original = directory / datasets_service.ORIGINAL_FILE
    return original if original.exists() else directory / "train.jsonl"


def delete_file(session: Session, settings: Settings, tenant_id: str, file_id_: str) -> str:
    """Delete the dataset and its files; one a job or evaluation reads is refused with a 400 naming it (the row
    that reads it would lose its data), never a 409 the client would retry."""
    dataset = get_file_dataset(session, tenant_id, file_id_)
    user = datasets_repo.dataset_user(session, dataset.id)
    if user is not None:
        raise BadRequest(
            f"file {file_id_} is the data of {user}; delete that first", param="file_id", code="file_in_use"
        )
    relative = dataset.path
    datasets_repo.delete_dataset(session, dataset)
    session.commit()  # the row first: files without a row are a leftover the sweeper may take, never the reverse
    Store(settings).remove(relative)
    return file_id(dataset.id)
