"""SQL for datasets."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Dataset, Evaluation, Job
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


def list_datasets_ordered(
    session: Session, tenant_id: str, *, limit: int, after: str | None, ascending: bool
) -> tuple[list[Dataset], bool]:
    """A keyset page in either order (OpenAI's files.list takes `order`); `after` is tenant-scoped as above."""
    if not ascending:
        return list_datasets(session, tenant_id, limit=limit, after=after)
    query = select(Dataset).where(Dataset.tenant_id == tenant_id)
    if after is not None:
        anchor = session.execute(
            select(Dataset.created_at, Dataset.id).where(Dataset.id == after, Dataset.tenant_id == tenant_id)
        ).first()
        if anchor is not None:
            created, ident = anchor
            query = query.where(
                (Dataset.created_at > created) | ((Dataset.created_at == created) & (Dataset.id > ident))
            )
    rows = list(session.scalars(query.order_by(Dataset.created_at.asc(), Dataset.id.asc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def dataset_user(session: Session, dataset_id: str) -> str | None:
    """The id of a job or evaluation that reads this dataset (which keeps it from being deleted), if any."""
    for model in (Job, Evaluation):
        user = session.scalars(select(model.id).where(model.dataset_id == dataset_id).limit(1)).first()
        if user is not None:
            return user
    return session.scalars(select(Job.id).where(Job.validation_dataset_id == dataset_id).limit(1)).first()


def delete_dataset(session: Session, dataset: Dataset) -> None:
    session.delete(dataset)
    session.flush()
