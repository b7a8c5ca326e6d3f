"""The OpenAI fine-tuning surface as a translation over the native services: a file is a dataset, a job is a job.

Nothing here validates, stores or trains on its own: ids and field names are mapped, the native services do the
work (the same parser, store, quotas and tenant checks), and refusals are re-worded in OpenAI's terms (400 with
`param`) where the native API would say 422.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import UploadFile
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.openai_schemas import (
    FileObject,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    JobError,
    JobHyperparameters,
    Model,
    OpenAIHyperparameters,
    OpenAIJobCreate,
)
from api.schemas import unix
from api.services import datasets as datasets_service
from api.services import jobs as jobs_service
from api.services import usage as usage_service
from core import checkpoints as core_checkpoints
from core.errors import InvalidInput, NotFound, TuneserveError
from core.jobspec import Hyperparameters, JobSpec
from core.models import AdapterStatus, Dataset, Job, JobEvent, JobStatus
from core.repository import adapters as adapters_repo
from core.repository import datasets as datasets_repo
from core.repository import jobs as jobs_repo
from core.settings import Settings
from core.storage import Store

FILE_PREFIX = "file-"
DATASET_PREFIX = "ds-"
# OpenAI's purposes; only fine-tune files are datasets (results files are made by jobs, never uploaded).
UPLOAD_PURPOSES = ("fine-tune",)


class BadRequest(TuneserveError):
    """OpenAI answers every refused request body with 400 (the client's BadRequestError), with `param`."""

    status_code = 400


def file_id(dataset_id: str) -> str:
    """ds-<hex> is file-<hex>: one row, two names, so a native dataset is a file and a file is a dataset."""
    return FILE_PREFIX + dataset_id.removeprefix(DATASET_PREFIX)


def dataset_id(file_id_: str) -> str | None:
    if not file_id_.startswith(FILE_PREFIX) or len(file_id_) > 40:
        return None
    return DATASET_PREFIX + file_id_.removeprefix(FILE_PREFIX)


def file_of(dataset: Dataset) -> FileObject:
    return FileObject(
        id=file_id(dataset.id),
        bytes=dataset.bytes,
        created_at=unix(dataset.created_at) or 0,
        filename=dataset.filename,
        purpose="fine-tune",
    )


def as_bad_request(e: InvalidInput) -> BadRequest:
    return BadRequest(e.message, param=e.param, code=e.code)


async def create_file(
    session: Session, settings: Settings, tenant_id: str, *, file: UploadFile, purpose: str
) -> Dataset:
    """Parse and store the upload as a dataset (keeping its bytes for /content); another purpose is a 400."""
    if purpose not in UPLOAD_PURPOSES:
        raise BadRequest(
            f"purpose {purpose!r} is not supported here: this deployment stores training data only "
            f"(purpose must be one of {', '.join(UPLOAD_PURPOSES)})",
            param="purpose",
            code="invalid_purpose",
        )
    await run_in_threadpool(usage_service.check_room, session, settings, tenant_id, "dataset")
    data = await datasets_service.read_limited(file, limit=settings.max_upload_bytes, param="file")
    upload = datasets_service.Upload(
        filename=file.filename or "upload.jsonl",
        train=data,
        test_filename=None,
        test=None,
        options=datasets_service.UploadOptions(test_fraction=None, seed=0),
        keep_original=True,
    )
    try:
        dataset, _ = await run_in_threadpool(datasets_service.store_dataset, session, settings, tenant_id, upload, None)
    except InvalidInput as e:
        raise as_bad_request(e) from None
    return dataset


def get_file_dataset(session: Session, tenant_id: str, file_id_: str, *, param: str = "file_id") -> Dataset:
    """The dataset behind a file id; unknown, malformed and another tenant's ids are all the same 404."""
    ident = dataset_id(file_id_)
    dataset = datasets_repo.get_owned_dataset(session, tenant_id, ident) if ident else None
    if dataset is None:
        raise NotFound(f"no file with id {file_id_!r}", param=param)
    return dataset


def list_files(
    session: Session, tenant_id: str, *, purpose: str | None, limit: int, after: str | None, order: str
) -> tuple[list[Dataset], bool]:
    if purpose is not None and purpose != "fine-tune":
        return [], False  # this deployment holds no file of any other purpose
    after_id = dataset_id(after) if after is not None else None
    return datasets_repo.list_datasets_ordered(
        session, tenant_id, limit=limit, after=after_id, ascending=order == "asc"
    )


def file_content_path(settings: Settings, dataset: Dataset) -> Path:
    """The bytes as uploaded; a dataset made through POST /datasets kept only its parsed train split, which is
    what a job trains on, so that is its content."""
    directory = Store(settings).resolve(dataset.path)
    original = directory / datasets_service.ORIGINAL_FILE
    return original if original.exists() else directory / "train.jsonl"


def delete_file(session: Session, settings: Settings, tenant_id: str, file_id_: str) -> str:
    """Delete the dataset and its files; one a job or evaluation reads is refused with a 400 naming it (the row
    that reads it would lose its data), never a 409 the client would retry."""
    dataset = get_file_dataset(session, tenant_id, file_id_)
    user = datasets_repo.dataset_user(session, dataset.id)
    if user is not None:
        raise BadRequest(
            f"file {file_id_} is the data of {user}; delete that first", param="file_id", code="file_in_use"
        )
    relative = dataset.path
    datasets_repo.delete_dataset(session, dataset)
    session.commit()  # the row first: files without a row are a leftover the sweeper may take, never the reverse
    Store(settings).remove(relative)
    return file_id(dataset.id)


# --- jobs: an OpenAI job is a native job (same row); these map the request and answer in OpenAI's shape ---------

OBJECTIVE_OF_TYPE = {"supervised": "sft", "dpo": "dpo"}
TYPE_OF_OBJECTIVE = {"sft": "supervised", "dpo": "dpo", "grpo": "reinforcement"}
EVENT_PREFIX = "ftevent-"
CHECKPOINT_PREFIX = "ftckpt-"
CHECKPOINT_MARK = ":ckpt-step-"


def _default_learning_rate() -> float:
    return float(Hyperparameters.model_fields["learning_rate"].default)


def parse_job_create(body: dict[str, Any]) -> OpenAIJobCreate:
    """The body in OpenAI's shape; a bad or unknown field is a 400 naming it (OpenAI answers 400, not 422)."""
    try:
        return OpenAIJobCreate.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("literal[", "int", "float")))
        what = "is not a field of a fine-tuning job" if first["type"] == "extra_forbidden" else first["msg"]
        raise BadRequest(f"{param}: {what}", param=param or None, code="invalid_value") from None


def _resolve_hyperparameters(body: OpenAIJobCreate) -> tuple[str, Hyperparameters]:
    """OpenAI's method and hyperparameters as the native objective and Hyperparameters ("auto" is the default)."""
    method = body.method
    kind = method.type if method is not None else "supervised"
    if kind == "reinforcement":
        raise BadRequest(
            "method.type reinforcement is not supported through /v1/fine_tuning yet (OpenAI grader shapes are not "
            "translated); use POST /jobs with objective grpo and a native grader",
            param="method.type",
            code="unsupported_method",
        )
    given: OpenAIHyperparameters | None = body.hyperparameters
    param_root = "hyperparameters"
    if method is not None:
        section = method.supervised if kind == "supervised" else method.dpo
        if section is not None and section.hyperparameters is not None:
            if given is not None:
                raise BadRequest(
                    "give hyperparameters under method, or the deprecated top-level ones, not both",
                    param="hyperparameters",
                )
            given = section.hyperparameters
            param_root = f"method.{kind}.hyperparameters"
    hp = given or OpenAIHyperparameters()
    fields: dict[str, Any] = {}
    if isinstance(hp.n_epochs, int):
        fields["n_epochs"] = hp.n_epochs
    if isinstance(hp.batch_size, int):
        fields["batch_size"] = hp.batch_size
    if isinstance(hp.learning_rate_multiplier, float | int):
        fields["learning_rate"] = _default_learning_rate() * hp.learning_rate_multiplier
    if isinstance(hp.beta, float | int):
        if kind != "dpo":
            raise BadRequest("beta applies to method.type dpo", param=f"{param_root}.beta")
        fields["beta"] = hp.beta
    try:
        return OBJECTIVE_OF_TYPE[kind], Hyperparameters(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        name = {"learning_rate": "learning_rate_multiplier"}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise BadRequest(f"{name}: {first['msg']}", param=f"{param_root}.{name}") from None


def adapter_of_model(session: Session, tenant_id: str, model: str, *, param: str = "model") -> str:
    """The adapter an ft: model names (ft:{base}:{org}:{suffix}:{job id}): the tenant's job's adapter; another
    tenant's, unknown and unfinished jobs' names are the same 404."""
    if CHECKPOINT_MARK in model:
        raise NotFound(
            f"checkpoint model {model!r} is not served here yet; use the job's fine_tuned_model", param=param
        )
    job_id = model.rsplit(":", 1)[-1]
    job = jobs_repo.get_owned_job(session, tenant_id, job_id) if job_id.startswith("ftjob-") else None
    if job is None or job.adapter_name is None or model != fine_tuned_model(job):
        raise NotFound(f"no fine-tuned model {model!r}", param=param)
    return job.adapter_name


def init_adapter_of(session: Session, tenant_id: str, model: str) -> str:
    return adapter_of_model(session, tenant_id, model, param="model")


def create_job(session: Session, settings: Settings, tenant_id: str, raw: dict[str, Any]) -> Job:
    """Map the OpenAI body onto a JobSpec and submit it through the native service (same checks, same row)."""
    body = parse_job_create(raw)
    if body.validation_file is not None:
        raise BadRequest(
            "validation_file is not supported yet: upload the held-out rows with POST /datasets test_file, or "
            "leave it out",
            param="validation_file",
            code="unsupported_field",
        )
    if body.metadata:
        raise BadRequest("metadata is not stored yet; leave it out", param="metadata", code="unsupported_field")
    if body.integrations:
        raise BadRequest("integrations (wandb) are not supported here", param="integrations")
    objective, hp = _resolve_hyperparameters(body)
    if body.seed is not None:
        hp.seed = body.seed
    dataset = get_file_dataset(session, tenant_id, body.training_file, param="training_file")
    init_adapter = None
    base_model: str | None = body.model
    if body.model.startswith("ft:"):
        init_adapter = init_adapter_of(session, tenant_id, body.model)
        base_model = None
    try:
        spec = JobSpec(
            dataset_id=dataset.id,
            base_model=base_model,
            objective=objective,
            init_adapter=init_adapter,
            hyperparameters=hp,
            suffix=body.suffix,
        )
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"{param}: {first['msg']}", param=param) from None
    try:
        job, _ = jobs_service.create_job(session, settings, tenant_id, spec)
    except InvalidInput as e:
        raise as_bad_request(
            InvalidInput(
                e.message,
                param={"base_model": "model", "dataset_id": "training_file"}.get(e.param or "", e.param),
                code=e.code,
            )
        ) from None
    return job


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """A finished job is answered as it is: cancelling it again will never succeed, and a 409 reads as retry."""
    job = jobs_service.get_job_or_404(session, tenant_id, job_id)
    if job.status.is_terminal:
        return job
    return jobs_service.cancel_job(session, tenant_id, job_id)


def fine_tuned_model(job: Job) -> str | None:
    if job.status != JobStatus.succeeded or job.adapter_name is None:
        return None
    return f"ft:{job.base_model}:{job.tenant_id}:{job.suffix or ''}:{job.id}"


def job_of(job: Job) -> FineTuningJob:
    hp = job.hyperparameters or {}
    lr = hp.get("learning_rate")
    objective = job.objective or "sft"
    resolved = JobHyperparameters(
        batch_size=hp.get("batch_size"),
        learning_rate_multiplier=lr / _default_learning_rate() if isinstance(lr, int | float) else None,
        n_epochs=hp.get("n_epochs"),
        beta=hp.get("beta") if objective == "dpo" else None,
    )
    kind = TYPE_OF_OBJECTIVE.get(objective)
    method = None
    if kind is not None:
        method = {"type": kind, kind: {"hyperparameters": resolved.model_dump(exclude_none=True)}}
    error = None
    if job.error_code is not None:
        param = {"dataset_id": "training_file", "file": "training_file"}.get(job.error_param or "", job.error_param)
        error = JobError(code=job.error_code, message=job.error_message or "", param=param)
    return FineTuningJob(
        id=job.id,
        created_at=unix(job.created_at) or 0,
        error=error,
        fine_tuned_model=fine_tuned_model(job),
        finished_at=unix(job.finished_at),
        hyperparameters=resolved,
        model=job.base_model,
        organization_id=job.tenant_id,
        result_files=[],
        seed=int(hp.get("seed", 0)),
        status=job.status.value,
        trained_tokens=job.train_tokens,
        training_file=file_id(job.dataset_id),
        validation_file=None,
        method=method,
    )


# Event ids are 64-bit integers in SQL; a larger cursor names no event (and SQLite could not even bind it).
MAX_EVENT_ID = 2**63 - 1


def list_events(
    session: Session, tenant_id: str, job_id: str, *, limit: int, after: str | None
) -> tuple[list[FineTuningJobEvent], bool]:
    jobs_service.get_job_or_404(session, tenant_id, job_id)
    before = None
    if after is not None:
        digits = after.removeprefix(EVENT_PREFIX)
        if not digits.isdigit() or int(digits) > MAX_EVENT_ID:
            raise BadRequest(f"after {after!r} is not an event id", param="after")
        before = int(digits)
    rows, has_more = jobs_repo.list_events_newest_first(session, job_id, limit=limit, before=before)
    return [event_of(e) for e in rows], has_more


def event_of(e: JobEvent) -> FineTuningJobEvent:
    level = {"warning": "warn", "warn": "warn", "error": "error"}.get(e.level, "info")
    is_metrics = e.kind == "metrics"
    data: dict[str, Any] | None = None
    if is_metrics:
        data = {"step": e.step, "train_loss": e.loss, "learning_rate": e.learning_rate, "epoch": e.epoch}
        data.update(e.metrics or {})
    return FineTuningJobEvent(
        id=f"{EVENT_PREFIX}{e.id}",
        created_at=unix(e.created_at) or 0,
        level=level,
        message=e.message or (f"Step {e.step}: training loss={e.loss}" if is_metrics else ""),
        type="metrics" if is_metrics else "message",
        data=data,
    )


def list_checkpoints(
    session: Session, settings: Settings, tenant_id: str, job_id: str
) -> list[FineTuningJobCheckpoint]:
    """The job's resumable checkpoints, newest first, named as OpenAI names them."""
    job = jobs_service.get_job_or_404(session, tenant_id, job_id)
    out = []
    for c in sorted(core_checkpoints.list_checkpoints(settings, job_id), key=lambda c: -c.step):
        if not c.complete:
            continue
        out.append(
            FineTuningJobCheckpoint(
                id=f"{CHECKPOINT_PREFIX}{job.id.removeprefix('ftjob-')}-{c.step}",
                created_at=int(c.created_at.timestamp()),
                fine_tuned_model_checkpoint=f"ft:{job.base_model}:{job.tenant_id}:{job.suffix or ''}:{job.id}{CHECKPOINT_MARK}{c.step}",
                fine_tuning_job_id=job.id,
                metrics={"step": float(c.step)},
                step_number=c.step,
            )
        )
    return out


def model_of(session: Session, settings: Settings, tenant_id: str, model: str) -> Model:
    """models.retrieve: the base, or the tenant's ft: model or adapter; anything else (another tenant's) a 404."""
    if model in (settings.served_model_name, settings.base_model):
        return Model(id=model, created=0, owned_by="tuneserve")
    name = adapter_of_model(session, tenant_id, model) if model.startswith("ft:") else model
    adapter = adapters_repo.get_owned_adapter(session, tenant_id, name)
    if adapter is None or adapter.status == AdapterStatus.deleted:
        raise NotFound(f"no model named {model!r}", param="model")
    return Model(id=model, created=unix(adapter.created_at) or 0, owned_by=tenant_id)


def deletable_adapter(session: Session, settings: Settings, tenant_id: str, model: str) -> str:
    """The adapter models.delete removes; the base model is a 400 (it is the deployment's, not a tenant's)."""
    if model in (settings.served_model_name, settings.base_model):
        raise BadRequest(
            f"{model!r} is the deployment's base model; only fine-tuned models can be deleted", param="model"
        )
    name = adapter_of_model(session, tenant_id, model) if model.startswith("ft:") else model
    session.commit()  # the lookup's transaction ends before the deletion takes its own
    return name
