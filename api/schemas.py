"""Response shapes, in the OpenAI fine-tuning API's conventions where one exists."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from core.models import (
    Adapter,
    AdapterOperation,
    Dataset,
    Evaluation,
    EvaluationSample,
    Job,
    JobEvent,
    JobStatus,
    WorkStatus,
    utcnow,
)

T = TypeVar("T")


def unix(ts: datetime | None) -> int | None:
    if ts is None:
        return None
    # SQLite hands back naive datetimes; every stored time is UTC.
    return int((ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp())


class ListResponse(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


class ErrorBody(BaseModel):
    type: str
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class DatasetOut(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    filename: str
    format: str
    bytes: int
    sha256: str
    created_at: int
    splits: dict[str, int]
    split_source: str
    test_fraction: float | None
    seed: int | None
    stats: dict[str, Any]
    objectives: list[str] = Field(description="The training objectives this dataset can feed")

    @classmethod
    def of(cls, d: Dataset) -> DatasetOut:
        from core.dataset_formats import OBJECTIVES_BY_FORMAT

        return cls(
            id=d.id,
            filename=d.filename,
            format=d.format,
            bytes=d.bytes,
            sha256=d.sha256,
            created_at=unix(d.created_at) or 0,
            splits={"train": d.train_rows, "test": d.test_rows},
            split_source=d.split_source,
            test_fraction=d.test_fraction,
            seed=d.split_seed,
            stats=d.stats,
            # Rows older than migration 0006 have none recorded: their format says.
            objectives=d.objectives or list(OBJECTIVES_BY_FORMAT.get(d.format, ("sft", "grpo"))),
        )


class JobProgress(BaseModel):
    step: int
    total_steps: int | None
    percent: float | None
    eta_seconds: float | None


class JobOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    status: str
    base_model: str
    dataset_id: str
    method: str
    objective: str = "sft"
    init_adapter: str | None = None
    grader: dict[str, Any] | None = None
    hyperparameters: dict[str, Any]
    suffix: str | None
    created_at: int
    started_at: int | None
    finished_at: int | None
    progress: JobProgress
    last_loss: float | None
    trained_tokens: int | None
    fine_tuned_model: str | None
    attempts: int
    cancel_requested: bool
    pause_requested: bool = Field(False, description="A pause is asked; the running attempt stops at its next step")
    error: ErrorBody | None
    evaluation: JobEvaluationSummary | None = None
    validation_dataset_id: str | None = None
    metadata: dict[str, str] | None = None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        percent = eta = None
        if job.total_steps:
            percent = round(100.0 * job.step / job.total_steps, 1)
            if job.status == JobStatus.running and job.started_at is not None and job.step > 0:
                elapsed = utcnow().timestamp() - (unix(job.started_at) or 0)
                eta = round(elapsed / job.step * (job.total_steps - job.step), 1)
        error = None
        if job.status == JobStatus.failed and job.error_code:
            error = ErrorBody(
                type="job_error", code=job.error_code, message=job.error_message or "", param=job.error_param
            )
        return cls(
            id=job.id,
            status=job.status.value,
            base_model=job.base_model,
            dataset_id=job.dataset_id,
            method=job.method,
            objective=job.objective,
            init_adapter=job.init_adapter,
            grader=job.grader,
            hyperparameters=job.hyperparameters,
            suffix=job.suffix,
            created_at=unix(job.created_at) or 0,
            started_at=unix(job.started_at),
            finished_at=unix(job.finished_at),
            progress=JobProgress(step=job.step, total_steps=job.total_steps, percent=percent, eta_seconds=eta),
            last_loss=job.last_loss,
            trained_tokens=job.train_tokens,
            fine_tuned_model=job.adapter_name,
            attempts=job.attempt_count,
            cancel_requested=job.cancel_requested,
            pause_requested=bool(job.pause_requested) and job.status == JobStatus.running,
            error=error,
            validation_dataset_id=job.validation_dataset_id,
            metadata=job.metadata_,
        )


class JobEventOut(BaseModel):
    id: int
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    type: str
    message: str
    attempt: int | None
    step: int | None
    epoch: float | None
    loss: float | None
    learning_rate: float | None
    metrics: dict[str, float] | None = Field(None, description="What else the trainer logged at this step")

    @classmethod
    def of(cls, e: JobEvent) -> JobEventOut:
        return cls(
            id=e.id,
            created_at=unix(e.created_at) or 0,
            level=e.level,
            type=e.kind,
            message=e.message,
            attempt=e.attempt,
            step=e.step,
            epoch=e.epoch,
            loss=e.loss,
            learning_rate=e.learning_rate,
            metrics=e.metrics,
        )


class AdapterOut(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    job_id: str | None
    base_model: str
    method: str
    rank: int | None
    alpha: float | None
    target_modules: list[str]
    files: dict[str, str]
    size_bytes: int
    status: str
    servable: bool
    servable_reason: str | None
    created_at: int
    parent: str | None = None
    scale: float | None = None

    @classmethod
    def of(cls, a: Adapter) -> AdapterOut:
        return cls(
            id=a.id,
            name=a.name,
            job_id=a.job_id,
            base_model=a.base_model,
            method=a.method,
            rank=a.rank,
            alpha=a.alpha,
            target_modules=a.target_modules,
            files=a.files,
            size_bytes=a.size_bytes,
            status=a.status.value,
            servable=a.servable,
            servable_reason=a.servable_reason,
            created_at=unix(a.created_at) or 0,
            parent=a.parent_name,
            scale=a.scale,
        )


class CheckpointOut(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    step: int
    complete: bool
    created_at: int
    size_bytes: int


class HealthOut(BaseModel):
    status: str
    checks: dict[str, str] = {}


def _work_error(row: Evaluation | AdapterOperation) -> ErrorBody | None:
    if row.status != WorkStatus.failed or not row.error_code:
        return None
    return ErrorBody(type="worker_error", code=row.error_code, message=row.error_message or "", param=row.error_param)


class EvaluationResult(BaseModel):
    scale: float | None
    metrics: dict[str, float]
    n_examples: int
    seconds: float


class EvaluationProgress(BaseModel):
    done_examples: int
    total_examples: int | None


class EvaluationOut(BaseModel):
    id: str
    object: Literal["evaluation"] = "evaluation"
    status: str
    dataset_id: str
    split: str
    base_model: str
    adapter: str | None
    job_id: str | None
    role: str | None
    metrics: list[str]
    scales: list[float] | None
    batch_size: int
    max_new_tokens: int
    max_examples: int | None
    n_examples: int | None
    progress: EvaluationProgress
    results: list[EvaluationResult]
    duration_seconds: float | None
    attempts: int
    cancel_requested: bool = False
    created_at: int
    started_at: int | None
    finished_at: int | None
    error: ErrorBody | None

    @classmethod
    def of(cls, e: Evaluation) -> EvaluationOut:
        total = e.n_examples * len(e.scales or [None]) if e.n_examples is not None else None
        return cls(
            id=e.id,
            status=e.status.value,
            dataset_id=e.dataset_id,
            split=e.split,
            base_model=e.base_model,
            adapter=e.adapter_name,
            job_id=e.job_id,
            role=e.role,
            metrics=e.metrics,
            scales=e.scales,
            batch_size=e.batch_size,
            max_new_tokens=e.max_new_tokens,
            max_examples=e.max_examples,
            n_examples=e.n_examples,
            progress=EvaluationProgress(done_examples=e.done_examples, total_examples=total),
            results=[EvaluationResult.model_validate(r) for r in e.results],
            duration_seconds=e.duration_seconds,
            attempts=e.attempt_count,
            cancel_requested=bool(e.cancel_requested),
            created_at=unix(e.created_at) or 0,
            started_at=unix(e.started_at),
            finished_at=unix(e.finished_at),
            error=_work_error(e),
        )


class EvaluationSampleOut(BaseModel):
    object: Literal["evaluation.sample"] = "evaluation.sample"
    index: int
    scale: float | None
    prompt: str
    reference: str
    prediction: str
    scores: dict[str, float]

    @classmethod
    def of(cls, s: EvaluationSample, shared: tuple[str, str] | None = None) -> EvaluationSampleOut:
        """shared: the example's (prompt, reference), stored once with the evaluation's first scale."""
        prompt, reference = shared if shared is not None else (s.prompt, s.reference)
        return cls(
            index=s.example_index,
            scale=s.scale,
            prompt=prompt,
            reference=reference,
            prediction=s.prediction,
            scores=s.scores,
        )


class EvaluationSamplePage(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvaluationSampleOut]
    total: int
    offset: int
    has_more: bool


class MetricComparison(BaseModel):
    name: str
    base: float | None
    adapter: float | None
    delta: float | None
    lower_is_better: bool
    improved: bool | None


class JobEvaluationSummary(BaseModel):
    status: str
    base_evaluation_id: str | None
    adapter_evaluation_id: str | None
    base: dict[str, float]
    adapter: dict[str, float]
    delta: dict[str, float]


class ExampleComparison(BaseModel):
    index: int
    prompt: str
    reference: str
    base: str
    adapter: str


class JobReport(BaseModel):
    object: Literal["fine_tuning.job.report"] = "fine_tuning.job.report"
    job_id: str
    job_status: str
    adapter: str | None
    dataset_id: str
    split: str
    n_examples: int | None
    evaluation: JobEvaluationSummary
    metrics: list[MetricComparison]
    adapter_scale: float | None
    scale_sweep: list[EvaluationResult]
    examples: list[ExampleComparison]


class AdapterOperationOut(BaseModel):
    id: str
    object: Literal["adapter.operation"] = "adapter.operation"
    kind: str
    status: str
    source_adapter: str
    scale: float
    result: str | None
    attempts: int
    cancel_requested: bool = False
    created_at: int
    finished_at: int | None
    error: ErrorBody | None

    @classmethod
    def of(cls, o: AdapterOperation) -> AdapterOperationOut:
        return cls(
            id=o.id,
            kind=o.kind.value,
            status=o.status.value,
            source_adapter=o.source_adapter,
            scale=o.scale,
            result=o.result_name,
            attempts=o.attempt_count,
            cancel_requested=bool(o.cancel_requested),
            created_at=unix(o.created_at) or 0,
            finished_at=unix(o.finished_at),
            error=_work_error(o),
        )


class QuotaOut(BaseModel):
    used: int
    limit: int
    setting: str = Field(description="The TUNESERVE_ setting that sets the limit")


class AdapterQuotaOut(QuotaOut):
    pending: int = Field(description="Queued or running jobs, derives and merges: each may add one; they count too")


class StorageUsageOut(QuotaOut):
    """Bytes: `used` is the total of the five kinds (evaluation samples estimated per sample)."""

    datasets: int
    adapters: int
    merged_models: int
    checkpoints: int
    evaluation_samples: int
    reserved: int = Field(
        description="Not in `used`: what queued and running work is estimated to write still; the quota is checked "
        "against used + reserved"
    )


class UsageOut(BaseModel):
    object: Literal["usage"] = "usage"
    active_jobs: QuotaOut
    active_evaluations: QuotaOut
    active_adapter_operations: QuotaOut
    adapters: AdapterQuotaOut
    storage_bytes: StorageUsageOut


JobOut.model_rebuild()
