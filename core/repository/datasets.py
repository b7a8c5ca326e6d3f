"""SQL for datasets."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Dataset
from core.repository import newest_first_page


def add_dataset(session: Session, dataset: Dataset) -> Dataset:
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, dataset_id: str) -> Dataset | None:
    return session.get(Dataset, dataset_id)


def list_datasets(session: Session, *, limit: int, after: str | None) -> tuple[list[Dataset], bool]:
    return newest_first_page(session, Dataset, select(Dataset), limit=limit, after=after)
