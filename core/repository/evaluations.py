"""SQL for evaluations and their samples (the lease functions are in core.repository.leases)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.models import Evaluation, EvaluationSample
from core.repository import get_owned, newest_first_page


def add_evaluation(session: Session, evaluation: Evaluation) -> Evaluation:
    session.add(evaluation)
    session.flush()
    return evaluation


def get_evaluation(session: Session, evaluation_id: str) -> Evaluation | None:
    """Any tenant's evaluation: for workers."""
    return session.get(Evaluation, evaluation_id)


def get_owned_evaluation(session: Session, tenant_id: str, evaluation_id: str) -> Evaluation | None:
    return get_owned(session, Evaluation, tenant_id, evaluation_id)


def list_evaluations(
    session: Session, tenant_id: str, *, limit: int, after: str | None, job_id: str | None = None
) -> tuple[list[Evaluation], bool]:
    query = select(Evaluation).where(Evaluation.tenant_id == tenant_id)
    if job_id is not None:
        query = query.where(Evaluation.job_id == job_id)
    return newest_first_page(session, Evaluation, query, limit=limit, after=after)


def evaluations_for_job(session: Session, job_id: str) -> dict[str, Evaluation]:
    """A job's before/after evaluations by role ("base", "adapter")."""
    rows = session.scalars(select(Evaluation).where(Evaluation.job_id == job_id).order_by(Evaluation.created_at))
    return {row.role: row for row in rows if row.role}


def add_samples(session: Session, samples: Sequence[EvaluationSample]) -> None:
    session.add_all(samples)


def delete_samples(session: Session, evaluation_id: str) -> None:
    """Drop the samples of an earlier, interrupted attempt before a new attempt writes its own."""
    session.execute(delete(EvaluationSample).where(EvaluationSample.evaluation_id == evaluation_id))


def shared_texts(
    session: Session, evaluation_id: str, scale: float | None, indexes: Sequence[int]
) -> dict[int, tuple[str, str]]:
    """example index -> (prompt, reference) of the samples at `scale`: the worker stores an example's prompt
    and reference once, with the first scale's sample, and leaves them empty at the other scales."""
    where = [
        EvaluationSample.evaluation_id == evaluation_id,
        EvaluationSample.scale.is_(None) if scale is None else EvaluationSample.scale == scale,
    ]
    out: dict[int, tuple[str, str]] = {}
    unique = sorted(set(indexes))
    for start in range(0, len(unique), 500):
        query = select(EvaluationSample.example_index, EvaluationSample.prompt, EvaluationSample.reference).where(
            *where, EvaluationSample.example_index.in_(unique[start : start + 500])
        )
        out.update({index: (prompt, reference) for index, prompt, reference in session.execute(query)})
    return out


def list_samples(
    session: Session,
    evaluation_id: str,
    *,
    limit: int,
    offset: int,
    scale: float | None = None,
    filter_scale: bool = False,
) -> tuple[list[EvaluationSample], int]:
    """A page of samples in (scale, example) order, and the total that match."""
    where = [EvaluationSample.evaluation_id == evaluation_id]
    if filter_scale:
        where.append(EvaluationSample.scale.is_(None) if scale is None else EvaluationSample.scale == scale)
    total = session.scalar(select(func.count()).select_from(EvaluationSample).where(*where)) or 0
    query = (
        select(EvaluationSample)
        .where(*where)
        .order_by(EvaluationSample.scale, EvaluationSample.example_index, EvaluationSample.id)
        .offset(offset)
        .limit(limit)
    )
    return list(session.scalars(query)), total
