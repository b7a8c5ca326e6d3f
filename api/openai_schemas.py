"""Response models of the OpenAI files and fine-tuning surface: field names and types as the `openai` client types
them (openai/types/file_object.py, file_deleted.py), so `client.files.*` parses what we answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.jobspec import Method


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune", "fine-tune-results"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


Auto = Literal["auto"]


class OpenAIHyperparameters(BaseModel):
    """OpenAI's method hyperparameters; "auto" resolves to the native API's documented defaults. Native knobs
    (core.jobspec.Hyperparameters: lora_r, max_seq_length, ...) may ride along; any other name is a 400 naming it
    (api.services.openai_fine_tuning checks the extras)."""

    model_config = ConfigDict(extra="allow")

    n_epochs: Auto | int | None = Field(None, description="auto: the native default, 3")
    batch_size: Auto | int | None = Field(None, description="auto: the native default, 8")
    learning_rate_multiplier: Auto | float | None = Field(
        None, description="× the native default learning rate (2e-4 for LoRA); auto: 1"
    )
    beta: Auto | float | None = Field(None, description="dpo only; auto: TRL's 0.1")


class OpenAIMethodBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: OpenAIHyperparameters | None = None


class OpenAIMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: OpenAIMethodBody | None = None
    dpo: OpenAIMethodBody | None = None
    reinforcement: dict[str, Any] | None = None


class OpenAIJobCreate(BaseModel):
    """The body of POST /v1/fine_tuning/jobs (openai/types/fine_tuning/job_create_params.py)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    suffix: str | None = Field(None, min_length=1, max_length=64)
    seed: int | None = Field(None, ge=0, le=2147483647)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="Up to 16 pairs: keys up to 64 characters, values up to 512 (as OpenAI)"
    )
    method: OpenAIMethod | None = None
    hyperparameters: OpenAIHyperparameters | None = Field(None, description="Deprecated by OpenAI; use method")
    peft: Method | None = Field(
        None, description="tuneserve's own: the PEFT method (lora by default, qlora, dora, ...)"
    )
    integrations: list[dict[str, Any]] | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None
    n_epochs: int | float | None = None
    beta: float | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float | None]
    step_number: int


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool
