"""Evaluations: validate, commit the row, then send its id; and the before/after report of a job."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from api.schemas import (
    EvaluationResult,
    EvaluationSampleOut,
    EvaluationSamplePage,
    ExampleComparison,
    JobEvaluationSummary,
    JobReport,
    MetricComparison,
)
from api.services import usage as usage_service
from api.services.adapters import live_adapter_or_404
from api.services.datasets import get_dataset_or_404
from core.adapter_ops import check_scalable
from core.errors import Conflict, InvalidInput, NotFound
from core.evaluation.metrics import ALL_METRICS, LOWER_IS_BETTER
from core.evaluation.spec import EvaluationSpec
from core.models import AdapterStatus, Evaluation, EvaluationSample, Job, JobStatus, WorkStatus
from core.queue import commit_and_send
from core.repository import evaluations as evaluations_repo
from core.repository import leases
from core.repository.datasets import get_dataset
from core.settings import Settings

REPORT_EXAMPLES = 5


def _unique(values: Sequence[object], param: str) -> None:
    seen: set[object] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise InvalidInput(f"{param}[{i}]: {value!r} appears twice", param=f"{param}[{i}]")
        seen.add(value)


def create_evaluation(session: Session, settings: Settings, tenant_id: str, spec: EvaluationSpec) -> Evaluation:
    dataset = get_dataset_or_404(session, tenant_id, spec.dataset_id)
    rows = dataset.test_rows if spec.split == "test" else dataset.train_rows
    if rows == 0:
        raise InvalidInput(
            f"dataset {dataset.id} has no {spec.split} split; upload it with test_file or test_fraction",
            param="split",
            code="split_missing",
        )
    _unique(list(spec.metrics), "metrics")
    spec.check_max_examples(settings, param="max_examples")
    scales: list[float] | None = None
    if spec.adapter is None:
        if spec.scales is not None:
            raise InvalidInput(
                "scales apply to an adapter; give adapter, or leave scales out for the base model", param="scales"
            )
    else:
        adapter = live_adapter_or_404(session, tenant_id, spec.adapter, param="adapter")
        if adapter.status != AdapterStatus.ready:
            raise InvalidInput(f"adapter {spec.adapter!r} is {adapter.status.value}", param="adapter")
        scales = list(spec.scales) if spec.scales is not None else [1.0]
        _unique(scales, "scales")
        check_scalable(adapter.method, scales, param="scales")
    evaluation = evaluations_repo.add_evaluation(
        session,
        Evaluation(
            tenant_id=tenant_id,
            dataset_id=dataset.id,
            split=spec.split,
            base_model=settings.served_model_name,
            adapter_name=spec.adapter,
            metrics=list(spec.metrics),
            scales=scales,
            batch_size=spec.batch_size,
            max_new_tokens=spec.max_new_tokens,
            # Without max_examples a split past the cap is scored up to it (the row says so).
            max_examples=spec.max_examples or (cap if rows > (cap := settings.max_evaluation_examples) else None),
            status=WorkStatus.queued,
            max_attempts=settings.max_attempts,
        ),
    )
    usage_service.admit(session, settings, tenant_id, "evaluation")  # 429 past max_active_evaluations
    commit_and_send(session, settings, Evaluation, evaluation.id)
    return evaluation


def get_evaluation_or_404(session: Session, tenant_id: str, evaluation_id: str) -> Evaluation:
    evaluation = evaluations_repo.get_owned_evaluation(session, tenant_id, evaluation_id)
    if evaluation is None:
        raise NotFound(f"no evaluation with id {evaluation_id!r}", param="evaluation_id")
    return evaluation


def cancel_evaluation(session: Session, evaluation: Evaluation) -> Evaluation:
    """A queued evaluation is cancelled at once; a running one is flagged for its worker (409 once it ended)."""
    if evaluation.status.is_terminal:
        raise Conflict(
            f"evaluation {evaluation.id} is already {evaluation.status.value}",
            param="evaluation_id",
            code="evaluation_finished",
        )
    leases.request_cancel(session, Evaluation, evaluation.id)
    return evaluation  # request_cancel expired it: what the caller reads next is the row as it is now


def sample_page(
    session: Session, evaluation: Evaluation, *, limit: int, offset: int, scale: float | None
) -> EvaluationSamplePage:
    if scale is not None and scale not in (evaluation.scales or []):
        raise InvalidInput(f"scale {scale} is not one of this evaluation's scales {evaluation.scales}", param="scale")
    rows, total = evaluations_repo.list_samples(
        session, evaluation.id, limit=limit, offset=offset, scale=scale, filter_scale=scale is not None
    )
    return EvaluationSamplePage(
        data=samples_out(session, evaluation, rows), total=total, offset=offset, has_more=offset + len(rows) < total
    )


def samples_out(
    session: Session, evaluation: Evaluation, rows: Sequence[EvaluationSample]
) -> list[EvaluationSampleOut]:
    """The samples with their prompt and reference, which the worker stores once, with the first scale's samples."""
    first = evaluation.scales[0] if evaluation.scales else None
    later = [r.example_index for r in rows if r.scale != first]
    shared = evaluations_repo.shared_texts(session, evaluation.id, first, later) if later else {}
    return [EvaluationSampleOut.of(r, shared.get(r.example_index) if r.scale != first else None) for r in rows]


def _result_at(evaluation: Evaluation | None, scale: float | None) -> EvaluationResult | None:
    """The evaluation's result at `scale` (1 when present for an adapter, else its first)."""
    if evaluation is None or not evaluation.results:
        return None
    results = [EvaluationResult.model_validate(r) for r in evaluation.results]
    return next((r for r in results if r.scale == scale), results[0])


def _status(session: Session, job: Job, rows: dict[str, Evaluation]) -> str:
    if not rows:
        # "pending" until the worker queues them after training; "none" when the job will have none.
        enabled = bool(job.evaluation and job.evaluation.get("enabled", True))
        dataset = get_dataset(session, job.dataset_id)
        will_run = enabled and dataset is not None and dataset.test_rows > 0
        return (
            "pending"
            if will_run and job.status in (JobStatus.queued, JobStatus.running, JobStatus.succeeded)
            else "none"
        )
    statuses = {r.status for r in rows.values()}
    if WorkStatus.failed in statuses:
        return "failed"
    if WorkStatus.cancelled in statuses:
        return "cancelled"
    if statuses == {WorkStatus.succeeded}:
        return "succeeded"
    return "running" if WorkStatus.running in statuses else "queued"


def job_summary(session: Session, job: Job) -> JobEvaluationSummary:
    """Base and adapter metrics of a job's before/after evaluation, and adapter minus base."""
    rows = evaluations_repo.evaluations_for_job(session, job.id)
    base, tuned = rows.get("base"), rows.get("adapter")
    base_result, tuned_result = _result_at(base, None), _result_at(tuned, 1.0)
    base_metrics = base_result.metrics if base_result else {}
    tuned_metrics = tuned_result.metrics if tuned_result else {}
    return JobEvaluationSummary(
        status=_status(session, job, rows),
        base_evaluation_id=base.id if base else None,
        adapter_evaluation_id=tuned.id if tuned else None,
        base=base_metrics,
        adapter=tuned_metrics,
        delta={k: tuned_metrics[k] - v for k, v in base_metrics.items() if k in tuned_metrics},
    )


def job_report(session: Session, job: Job) -> JobReport:
    """The job's base and adapter side by side: per-metric delta, the adapter's scale sweep, a few examples."""
    summary = job_summary(session, job)
    rows = evaluations_repo.evaluations_for_job(session, job.id)
    base, tuned = rows.get("base"), rows.get("adapter")
    tuned_result = _result_at(tuned, 1.0)
    names = [m for m in ALL_METRICS if m in summary.base or m in summary.adapter]
    metrics = []
    for name in names:
        b, a = summary.base.get(name), summary.adapter.get(name)
        delta = a - b if a is not None and b is not None else None
        lower = name in LOWER_IS_BETTER
        metrics.append(
            MetricComparison(
                name=name,
                base=b,
                adapter=a,
                delta=delta,
                lower_is_better=lower,
                improved=None if delta is None or delta == 0 else (delta < 0) == lower,
            )
        )
    examples: list[ExampleComparison] = []
    if base is not None and tuned is not None and summary.status == "succeeded" and tuned_result is not None:
        base_rows, _ = evaluations_repo.list_samples(session, base.id, limit=REPORT_EXAMPLES, offset=0)
        tuned_rows, _ = evaluations_repo.list_samples(
            session, tuned.id, limit=REPORT_EXAMPLES, offset=0, scale=tuned_result.scale, filter_scale=True
        )
        examples = [
            ExampleComparison(
                index=b.example_index, prompt=b.prompt, reference=b.reference, base=b.prediction, adapter=t.prediction
            )
            for b, t in zip(base_rows, tuned_rows, strict=False)
        ]
    return JobReport(
        job_id=job.id,
        job_status=job.status.value,
        adapter=job.adapter_name,
        dataset_id=job.dataset_id,
        split="test",
        n_examples=shown.n_examples if (shown := tuned or base) else None,
        evaluation=summary,
        metrics=metrics,
        adapter_scale=tuned_result.scale if tuned_result else None,
        scale_sweep=[EvaluationResult.model_validate(r) for r in tuned.results] if tuned else [],
        examples=examples,
    )
