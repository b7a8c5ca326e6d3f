"""Response shapes, in the OpenAI fine-tuning API's conventions where one exists."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from core.models import Adapter, Dataset, Job, JobEvent, utcnow

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

    @classmethod
    def of(cls, d: Dataset) -> "DatasetOut":
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
    error: ErrorBody | None

    @classmethod
    def of(cls, job: Job) -> "JobOut":
        percent = eta = None
        if job.total_steps:
            percent = round(100.0 * job.step / job.total_steps, 1)
            if job.status.value == "running" and job.started_at is not None and job.step > 0:
                elapsed = utcnow().timestamp() - (unix(job.started_at) or 0)
                eta = round(elapsed / job.step * (job.total_steps - job.step), 1)
        error = None
        if job.status.value == "failed" and job.error_code:
            error = ErrorBody(type="job_error", code=job.error_code, message=job.error_message or "", param=job.error_param)
        return cls(
            id=job.id,
            status=job.status.value,
            base_model=job.base_model,
            dataset_id=job.dataset_id,
            method=job.method,
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
            error=error,
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

    @classmethod
    def of(cls, e: JobEvent) -> "JobEventOut":
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

    @classmethod
    def of(cls, a: Adapter) -> "AdapterOut":
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
        )


class HealthOut(BaseModel):
    status: str
    checks: dict[str, str] = {}
