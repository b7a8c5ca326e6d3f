"""GET /datasets/{id}/rows: the first rows of a split, as stored (normalized), for a preview before training.

The console shows them on its datasets page; any client can use it to check what an upload became (the format it
was read as, the chat messages a prompt/completion row turned into) without downloading the whole file.
"""

from __future__ import annotations

import json
from itertools import islice
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.deps import SessionDep, SettingsDep, TenantDep
from core.bounds import MAX_INT32
from core.errors import NotFound
from core.repository import datasets as datasets_repo
from core.storage import Store

router = APIRouter(prefix="/datasets", tags=["datasets"])

# Rows are at most TUNESERVE_MAX_LINE_BYTES each: a small page keeps an answer small.
MAX_ROWS = 20


class DatasetRowsOut(BaseModel):
    object: Literal["list"] = "list"
    dataset_id: str
    split: str
    offset: int
    data: list[dict[str, Any]]
    has_more: bool


@router.get("/{dataset_id}/rows", response_model=DatasetRowsOut)
def list_dataset_rows(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    dataset_id: str,
    split: Literal["train", "test"] = "train",
    limit: Annotated[int, Query(ge=1, le=MAX_ROWS)] = 5,
    offset: Annotated[int, Query(ge=0, le=MAX_INT32)] = 0,
) -> DatasetRowsOut:
    """Rows `offset` .. `offset + limit` of the split, in the stored (normalized) form; an empty split has none."""
    dataset = datasets_repo.get_owned_dataset(session, tenant, dataset_id)
    if dataset is None:
        raise NotFound(f"no dataset with id {dataset_id!r}", param="dataset_id")
    relative = dataset.path
    # The row is all we need: end the read's transaction before reading the file (invariant 6).
    session.commit()
    path = Store(settings).resolve(relative) / f"{split}.jsonl"
    rows: list[dict[str, Any]] = []
    has_more = False
    if path.exists():
        with path.open("rb") as f:
            lines = [line for line in islice(f, offset, offset + limit + 1) if line.strip()]
        has_more = len(lines) > limit
        rows = [json.loads(line) for line in lines[:limit]]
    return DatasetRowsOut(dataset_id=dataset_id, split=split, offset=offset, data=rows, has_more=has_more)
