"""A job's before/after evaluations: planned in the transaction that marks the job succeeded."""

from __future__ import annotations

from sqlalchemy.orm import Session

from core.evaluation.spec import JobEvaluation
from core.models import Evaluation, Job, JobEvent
from core.repository import evaluations as evaluations_repo
from core.repository import jobs as jobs_repo
from core.repository import leases
from core.repository.datasets import get_dataset
from core.settings import Settings


def plan_job_evaluations(session: Session, settings: Settings, job: Job, adapter_name: str) -> list[str]:
    """Add the base and adapter evaluations on the test split (once) if the job asked for them; their ids.

    Called in the same transaction as the job's success, so a worker dying right after it cannot leave a
    succeeded job whose evaluation never starts (invariant 5). Each row is marked as sent; the supervisor sends
    it after the commit, and the reconciler again if that send is lost.
    """
    if not job.evaluation:
        return []
    # Through the spec, so a row written by an older version gets today's defaults for what it lacks.
    options = JobEvaluation.model_validate(job.evaluation).model_dump()
    if not options.pop("enabled") or evaluations_repo.evaluations_for_job(session, job.id):
        return []
    dataset = get_dataset(session, job.dataset_id)
    if dataset is None or dataset.test_rows == 0:
        jobs_repo.add_event(
            session, JobEvent(job_id=job.id, kind="status", message="no test split: before/after evaluation skipped")
        )
        return []
    scales = options.pop("scales") or [1.0]
    # "Before" is where training started: the init_adapter when the job continued one (SFT, then DPO), else the base.
    before_scales = [1.0] if job.init_adapter else None
    rows = [
        Evaluation(
            tenant_id=job.tenant_id,
            dataset_id=job.dataset_id,
            split="test",
            base_model=job.base_model,
            adapter_name=adapter,
            job_id=job.id,
            role=role,
            scales=row_scales,
            max_attempts=settings.max_attempts,
            grader=job.grader,
            **options,
        )
        for role, adapter, row_scales in (("base", job.init_adapter, before_scales), ("adapter", adapter_name, scales))
    ]
    ids = [evaluations_repo.add_evaluation(session, row).id for row in rows]
    for evaluation_id in ids:
        leases.mark_dispatched(session, Evaluation, evaluation_id)
    jobs_repo.add_event(
        session, JobEvent(job_id=job.id, kind="status", message=f"evaluation queued: base {ids[0]}, adapter {ids[1]}")
    )
    return ids
