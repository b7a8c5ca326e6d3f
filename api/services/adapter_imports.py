"""POST /adapters: stream the archive to disk, unpack and check it, record the adapter (not servable yet)
and queue its canary, which a worker runs before the adapter may be served."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

from fastapi import UploadFile
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.services import usage as usage_service
from core.adapter_import import check_unpacked, unpack_adapter
from core.errors import PayloadTooLarge
from core.models import Adapter, AdapterOperation, AdapterStatus, OperationKind, WorkStatus
from core.queue import commit_and_send
from core.repository import adapter_operations as operations_repo
from core.repository import adapters as adapters_repo
from core.settings import Settings
from core.storage import Store, hash_dir

CHUNK = 1 << 20
CANARY_PENDING = "waiting for its canary check (output must differ from the base model's)"


async def save_limited(upload: UploadFile, target: Path, *, limit: int, param: str) -> None:
    """Stream the upload to a file (memory stays flat), refused with 413 as soon as it passes the limit."""
    total = 0
    with target.open("wb") as out:
        while chunk := await upload.read(CHUNK):
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"{param} is larger than the limit of {limit} bytes", param=param)
            out.write(chunk)


def imported_name(suffix: str | None) -> str:
    """Unique across tenants without asking SQL, so a name never tells one tenant about another's."""
    return f"imp-{suffix or 'adapter'}-{secrets.token_hex(12)}"


async def import_adapter(
    session: Session, settings: Settings, tenant_id: str, upload: UploadFile, *, suffix: str | None
) -> Adapter:
    # Refused before the upload is read when the tenant has no room left (admit() decides, after the insert).
    await run_in_threadpool(usage_service.check_room, session, settings, tenant_id, "import")
    store = Store(settings)
    with store.staging_dir() as work:
        archive = work / "upload"
        await save_limited(upload, archive, limit=settings.max_adapter_upload_bytes, param="file")
        return await run_in_threadpool(_unpack_and_record, session, settings, tenant_id, store, work, suffix)


def _unpack_and_record(
    session: Session, settings: Settings, tenant_id: str, store: Store, work: Path, suffix: str | None
) -> Adapter:
    staged = work / "adapter"
    staged.mkdir()
    unpack_adapter(work / "upload", staged, settings)
    imported = check_unpacked(staged, settings)
    name = imported_name(suffix)
    relative = store.adapter_dir(name)
    files, size = hash_dir(staged)
    store.publish(staged, relative)  # in place before its row exists: a row never points at missing files
    adapter = adapters_repo.add_adapter(
        session,
        Adapter(
            name=name,
            tenant_id=tenant_id,
            job_id=None,
            base_model=settings.served_model_name,
            method="lora",
            rank=imported.rank,
            alpha=imported.alpha,
            target_modules=imported.target_modules,
            path=relative,
            files=files,
            size_bytes=size,
            status=AdapterStatus.validating,
            servable=False,
            servable_reason=CANARY_PENDING,
        ),
    )
    operation = operations_repo.add_operation(
        session,
        AdapterOperation(
            tenant_id=tenant_id,
            kind=OperationKind.canary,
            source_adapter=name,
            scale=1.0,
            status=WorkStatus.queued,
            max_attempts=settings.max_attempts,
        ),
    )
    try:
        usage_service.admit(session, settings, tenant_id, "import", new_bytes=size)
    except Exception:
        shutil.rmtree(store.resolve(relative), ignore_errors=True)  # the rollback drops the rows; the files go too
        raise
    commit_and_send(session, settings, AdapterOperation, operation.id)
    return adapter
