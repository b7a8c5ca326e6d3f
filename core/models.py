"""SQL registry: datasets, jobs, job events, adapters. The schema changes only through migrations/."""

from __future__ import annotations

import enum
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base
from core.statuses import TERMINAL_STATUSES


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class JobStatus(str, enum.Enum):
    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    # Stopped at a checkpoint on request, holding no worker; resume queues it again from that checkpoint.
    paused = "paused"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self.value in TERMINAL_STATUSES


class AdapterStatus(str, enum.Enum):
    validating = "validating"  # imported; its canary check has not run yet
    ready = "ready"
    unhealthy = "unhealthy"
    deleted = "deleted"


class TrainingMethod(str, enum.Enum):
    """How a job trains (the API's core.jobspec.Method names the same values; tests/test_models.py checks)."""

    lora = "lora"
    qlora = "qlora"
    dora = "dora"
    prompt_tuning = "prompt_tuning"
    p_tuning = "p_tuning"
    prefix_tuning = "prefix_tuning"
    full = "full"


class OperationKind(str, enum.Enum):
    """What an adapter operation does."""

    derive = "derive"  # a new adapter with B x scale
    merge = "merge"  # a full model W0 + scale x BA
    canary = "canary"  # an imported adapter's health check


def _enum(cls: type[enum.Enum], length: int = 32) -> Enum:
    # Stored as plain strings (no native enum type) so new states never need an ALTER TYPE.
    return Enum(cls, native_enum=False, length=length, values_callable=lambda e: [m.value for m in e])


# The tenant every resource belongs to when auth is off (the embedded demo); created by migration 0004.
DEFAULT_TENANT_ID = "tn-default"


class Tenant(Base):
    """Who owns datasets, jobs, adapters and evaluations; another tenant's resources are invisible (404)."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("tn"))
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """A bearer key of a tenant. Only its sha256 is stored: keys are 256-bit random, so a slow hash adds nothing."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    label: Mapped[str] = mapped_column(String(64), default="")
    prefix: Mapped[str] = mapped_column(String(16), doc="The key's first characters, to tell keys apart in lists")
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


def tenant_column() -> Mapped[str]:
    return mapped_column(ForeignKey("tenants.id"), index=True)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = tenant_column()
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    train_rows: Mapped[int] = mapped_column(Integer)
    test_rows: Mapped[int] = mapped_column(Integer, default=0)
    # How the test split came to be: "file" (uploaded), "fraction" (held out with a seed) or "none".
    split_source: Mapped[str] = mapped_column(String(16))
    test_fraction: Mapped[float | None] = mapped_column(Float, nullable=True)
    split_seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(String(512), doc="Directory relative to the store root")
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The training objectives its rows can feed (core.dataset_formats.OBJECTIVES_BY_FORMAT); null on rows older than
    # migration 0006, which were all supervised (sft, grpo).
    objectives: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ftjob"))
    tenant_id: Mapped[str] = tenant_column()
    base_model: Mapped[str] = mapped_column(String(512))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    method: Mapped[TrainingMethod] = mapped_column(_enum(TrainingMethod))
    # What the job optimises (core.jobspec.Objective): sft, dpo, kto, orpo or grpo.
    objective: Mapped[str] = mapped_column(String(16), default="sft", server_default="sft")
    # The adapter training starts from (its weights, rank and targets); the new adapter records it as its parent.
    init_adapter: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # GRPO's declarative grader (core.graders), validated at creation.
    grader: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), index=True, default=JobStatus.queued)

    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Asked to pause: the running attempt saves a checkpoint at its next step, releases the lease and the job is paused.
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    dispatch_count: Mapped[int] = mapped_column(Integer, default=0, doc="sends since the last claim (backoff)")
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    adapter_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # The before/after evaluation to run when the job succeeds (core.jobspec.JobEvaluation); null: none.
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Held-out rows whose loss is computed during training (their train split); null: none.
    validation_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), nullable=True, index=True)
    # The client's own labels (OpenAI's metadata: up to 16 string pairs), stored and returned; `metadata` is taken by
    # SQLAlchemy's declarative base, hence the attribute's name.
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)

    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_param: Mapped[str | None] = mapped_column(String(128), nullable=True)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    kind: Mapped[str] = mapped_column(String(32), default="message", doc="message | metrics | status")
    attempt: Mapped[int | None] = mapped_column(Integer, nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    epoch: Mapped[float | None] = mapped_column(Float, nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    learning_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    # Whatever else the trainer logged at this step (DPO: rewards/chosen, rewards/rejected, rewards/margins, ...).
    metrics: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)


class Adapter(Base):
    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ad"))
    tenant_id: Mapped[str] = tenant_column()
    name: Mapped[str] = mapped_column(String(128), unique=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, unique=True)
    base_model: Mapped[str] = mapped_column(String(512))
    method: Mapped[str] = mapped_column(String(32))
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    alpha: Mapped[float | None] = mapped_column(Float, nullable=True)
    target_modules: Mapped[list[str]] = mapped_column(JSON, default=list)
    path: Mapped[str] = mapped_column(String(512), doc="Directory relative to the store root")
    files: Mapped[dict[str, str]] = mapped_column(JSON, doc="file name -> sha256")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[AdapterStatus] = mapped_column(_enum(AdapterStatus), default=AdapterStatus.ready)
    servable: Mapped[bool] = mapped_column(Boolean, default=True)
    servable_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # A derived adapter (or merged model) records where it came from: the source adapter and the scale s.
    parent_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    scale: Mapped[float | None] = mapped_column(Float, nullable=True)


class WorkStatus(str, enum.Enum):
    """States of worker-run records other than jobs: evaluations and adapter operations."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self.value in TERMINAL_STATUSES


class LeasedWork:
    """Columns of a record a worker claims with a lease (as jobs are): status, attempts, lease, error, times."""

    status: Mapped[WorkStatus] = mapped_column(_enum(WorkStatus), index=True, default=WorkStatus.queued)
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    dispatch_count: Mapped[int] = mapped_column(Integer, default=0, doc="sends since the last claim (backoff)")
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_param: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Evaluation(LeasedWork, Base):
    """Greedy predictions and metrics of the base model or an adapter (at one or more scales) on a split."""

    __tablename__ = "evaluations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("eval"))
    tenant_id: Mapped[str] = tenant_column()
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    split: Mapped[str] = mapped_column(String(16))
    base_model: Mapped[str] = mapped_column(String(512))
    adapter_name: Mapped[str | None] = mapped_column(String(128), nullable=True, doc="null: the base model")
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    role: Mapped[str | None] = mapped_column(String(16), nullable=True, doc="a job's 'base' or 'adapter' side")
    metrics: Mapped[list[str]] = mapped_column(JSON)
    scales: Mapped[list[float] | None] = mapped_column(JSON, nullable=True, doc="adapter scales; null for the base")
    batch_size: Mapped[int] = mapped_column(Integer)
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    max_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    done_examples: Mapped[int] = mapped_column(Integer, default=0, doc="progress over all scales")
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list, doc="per scale: metrics, seconds")
    duration_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # A declarative grader (core.graders) scored as the "grader" metric on every prediction; null: none.
    grader: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class EvaluationSample(Base):
    """One example's prompt, reference, prediction and scores, at one scale of one evaluation."""

    __tablename__ = "evaluation_samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    evaluation_id: Mapped[str] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"), index=True)
    scale: Mapped[float | None] = mapped_column(Float, nullable=True)
    example_index: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    reference: Mapped[str] = mapped_column(Text)
    prediction: Mapped[str] = mapped_column(Text)
    scores: Mapped[dict[str, float]] = mapped_column(JSON)


class AdapterOperation(LeasedWork, Base):
    """A request to derive a scaled adapter or merge one into a full model, run by a worker."""

    __tablename__ = "adapter_operations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("adop"))
    tenant_id: Mapped[str] = tenant_column()
    kind: Mapped[OperationKind] = mapped_column(_enum(OperationKind, length=16))
    source_adapter: Mapped[str] = mapped_column(String(128))
    scale: Mapped[float] = mapped_column(Float)
    result_name: Mapped[str | None] = mapped_column(String(128), nullable=True)


class IdempotencyKey(Base):
    """A client's Idempotency-Key on a create endpoint: the request it came with and the resource it made.

    Keys are per tenant. Written in the same transaction as the resource; the unique (tenant, endpoint, key) makes concurrent
    duplicates create one resource.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("tenant_id", "endpoint", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    endpoint: Mapped[str] = mapped_column(String(64), doc="e.g. 'POST /jobs'")
    key: Mapped[str] = mapped_column(String(255))
    request_sha256: Mapped[str] = mapped_column(
        String(64), doc="sha256 of the request body (JSON) or its parts (multipart)"
    )
    resource_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
