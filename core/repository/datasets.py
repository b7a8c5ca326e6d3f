"""SQL for datasets."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Dataset
from core.repository import get_owned, newest_first_page


def add_dataset(session: Session, dataset: Dataset) -> Dataset:
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, dataset_id: str) -> Dataset | None:
    """Any tenant's dataset: for workers, which act on ids the API already checked."""
    return session.get(Dataset, dataset_id)


def get_owned_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset | None:
    return get_owned(session, Dataset, tenant_id, dataset_id)


def list_datasets(session: Session, tenant_id: str, *, limit: int, after: str | None) -> tuple[list[Dataset], bool]:
    query = select(Dataset).where(Dataset.tenant_id == tenant_id)
    return newest_first_page(session, Dataset, query, limit=limit, after=after)
