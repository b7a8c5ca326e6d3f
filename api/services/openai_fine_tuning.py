"""The OpenAI fine-tuning surface as a translation over the native services: a file is a dataset, a job is a job.

Nothing here validates, stores or trains on its own: ids and field names are mapped, the native services do the
work (the same parser, store, quotas and tenant checks), and refusals are re-worded in OpenAI's terms (400 with
`param`) where the native API would say 422.
"""

from __future__ import annotations

import csv
import io
import math
import time
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
from api.schemas import JobOut, unix
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
) -> tuple[list[FileObject], bool]:
    """Uploaded files (datasets); with purpose fine-tune-results, the results files of succeeded jobs instead."""
    if purpose == "fine-tune-results":
        return list_results_files(session, tenant_id, limit=limit, after=after)
    if purpose is not None and purpose != "fine-tune":
        return [], False  # this deployment holds no file of any other purpose
    after_id = dataset_id(after) if after is not None else None
    rows, has_more = datasets_repo.list_datasets_ordered(
        session, tenant_id, limit=limit, after=after_id, ascending=order == "asc"
    )
    return [file_of(d) for d in rows], has_more


def get_file(session: Session, tenant_id: str, file_id_: str) -> FileObject:
    job = results_job(session, tenant_id, file_id_)
    if job is not None:
        return results_file_of(session, job)
    return file_of(get_file_dataset(session, tenant_id, file_id_))


def file_content(session: Session, settings: Settings, tenant_id: str, file_id_: str) -> Path | bytes:
    """An uploaded file's path (its bytes as uploaded), or a results file's CSV."""
    job = results_job(session, tenant_id, file_id_)
    if job is not None:
        return results_csv(session, job)
    return file_content_path(settings, get_file_dataset(session, tenant_id, file_id_))


def file_content_path(settings: Settings, dataset: Dataset) -> Path:
    """The bytes as uploaded; a dataset made through POST /datasets kept only its parsed train split, which is
    what a job trains on, so that is its content."""
    directory = Store(settings).resolve(dataset.path)
    original = directory / datasets_service.ORIGINAL_FILE
    return original if original.exists() else directory / "train.jsonl"


def delete_file(session: Session, settings: Settings, tenant_id: str, file_id_: str) -> str:
    """Delete the dataset and its files; one a job or evaluation reads is refused with a 400 naming it (the row
    that reads it would lose its data), never a 409 the client would retry."""
    if results_job(session, tenant_id, file_id_) is not None:
        raise BadRequest(
            f"{file_id_} is a job's results file, made from its events; it goes with the job",
            param="file_id",
            code="file_not_deletable",
        )
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

# --- jobs: an OpenAI job is a native job (same row); these map the request and answer in OpenAI's shape ---------

OBJECTIVE_OF_TYPE = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}
TYPE_OF_OBJECTIVE = {"sft": "supervised", "dpo": "dpo", "grpo": "reinforcement"}
# OpenAI's job statuses by ours; a status this table lacks (one added later) is shown as it is.
STATUS_OF = {s: s for s in ("validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused")}
EVENT_PREFIX = "ftevent-"
CHECKPOINT_PREFIX = "ftckpt-"
CHECKPOINT_MARK = ":ckpt-step-"
# OpenAI keeps the checkpoints of the last three epochs, each a model; so do jobs made here (one every epoch).
OPENAI_CHECKPOINTS = 3
# Native names of request fields, as OpenAI's request calls them.
PARAM_OF_NATIVE = {
    "base_model": "model",
    "dataset_id": "training_file",
    "validation_dataset_id": "validation_file",
    "init_adapter": "model",
    "grader": "method.reinforcement.grader",
    "method": "peft",
    "objective": "method.type",
}


# Native hyperparameters a /v1 job may carry beside OpenAI's: all but those OpenAI's own fields (or this mapping)
# set, so one value never has two names.
NATIVE_KNOBS = frozenset(Hyperparameters.model_fields) - {
    "n_epochs",
    "batch_size",
    "learning_rate",
    "beta",
    "seed",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "checkpoint_adapters",
}


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


def _method_hyperparameters(body: OpenAIJobCreate, kind: str) -> tuple[OpenAIHyperparameters, str]:
    """The hyperparameters given (under method, or the deprecated top level; not both) and where they were."""
    given: OpenAIHyperparameters | None = body.hyperparameters
    param_root = "hyperparameters"
    method = body.method
    if method is not None:
        section: Any = getattr(method, kind)
        hyperparameters = section.get("hyperparameters") if isinstance(section, dict) else None
        if section is not None and not isinstance(section, dict):
            hyperparameters = section.hyperparameters
        if hyperparameters is not None:
            if given is not None:
                raise BadRequest(
                    "give hyperparameters under method, or the deprecated top-level ones, not both",
                    param="hyperparameters",
                )
            param_root = f"method.{kind}.hyperparameters"
            try:
                given = OpenAIHyperparameters.model_validate(hyperparameters)
            except ValidationError as e:
                name = ".".join(str(p) for p in e.errors()[0]["loc"][:1])
                raise BadRequest(f"{name}: {e.errors()[0]['msg']}", param=f"{param_root}.{name}") from None
    return given or OpenAIHyperparameters(), param_root


def _resolve_hyperparameters(body: OpenAIJobCreate) -> tuple[str, Hyperparameters, str]:
    """OpenAI's method and hyperparameters as the native objective and Hyperparameters ("auto" is the default);
    and the param path they were given at."""
    kind = body.method.type if body.method is not None else "supervised"
    hp, param_root = _method_hyperparameters(body, kind)
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
    for name, value in (hp.model_extra or {}).items():
        if name not in NATIVE_KNOBS:
            raise BadRequest(
                f"{param_root}.{name} is not a hyperparameter here: OpenAI's are n_epochs, batch_size, "
                "learning_rate_multiplier and beta; tuneserve's own (lora_r, max_seq_length, ...) may ride along",
                param=f"{param_root}.{name}",
                code="invalid_value",
            )
        fields[name] = value
    try:
        return OBJECTIVE_OF_TYPE[kind], Hyperparameters(**fields), param_root
    except ValidationError as e:
        first = e.errors()[0]
        name = {"learning_rate": "learning_rate_multiplier"}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise BadRequest(f"{name}: {first['msg']}", param=f"{param_root}.{name}") from None


def _reinforcement_grader(body: OpenAIJobCreate) -> dict[str, Any]:
    """The native grader of a reinforcement job: OpenAI's grader JSON as api.services.openai_graders translates it
    (a 400 naming the field it refuses)."""
    # Imported here: that module builds on this one's BadRequest.
    from api.services.openai_graders import native_grader_from_openai

    section = body.method.reinforcement if body.method is not None else None
    grader = section.get("grader") if isinstance(section, dict) else None
    if not isinstance(grader, dict):
        raise BadRequest(
            "method.reinforcement.grader is required: the grader that rewards each sample",
            param="method.reinforcement.grader",
        )
    return dict(native_grader_from_openai(grader, "method.reinforcement.grader"))


def parse_model(model: str) -> tuple[str, int | None]:
    """An ft: name as (the job's fine_tuned_model, the checkpoint step or None)."""
    head, mark, step = model.rpartition(CHECKPOINT_MARK)
    if mark and step.isdigit():
        return head, int(step)
    return model, None


def adapter_of_model(session: Session, tenant_id: str, model: str, *, param: str = "model") -> str:
    """The adapter an ft: model (ft:{base}:{org}:{suffix}:{job id}) or one of its checkpoints (…:ckpt-step-N) names:
    the tenant's job's adapter or published checkpoint; another tenant's, unknown and unfinished jobs' names are
    the same 404."""
    name, step = parse_model(model)
    job_id = name.rsplit(":", 1)[-1]
    job = jobs_repo.get_owned_job(session, tenant_id, job_id) if job_id.startswith("ftjob-") else None
    if job is None or job.adapter_name is None or name != fine_tuned_model(job):
        raise NotFound(f"no fine-tuned model {model!r}", param=param)
    if step is None:
        return job.adapter_name
    adapter = adapters_repo.get_owned_adapter(
        session, tenant_id, core_checkpoints.checkpoint_adapter_name(job.adapter_name, step)
    )
    if adapter is None or adapter.status == AdapterStatus.deleted:
        raise NotFound(f"no checkpoint model {model!r} (see the job's checkpoints)", param=param)
    return adapter.name


def _checkpoint_hyperparameters(settings: Settings, hp: Hyperparameters, train_rows: int) -> None:
    """One checkpoint every epoch, the last three kept and published as models (OpenAI's checkpoints)."""
    keep = max(2, min(OPENAI_CHECKPOINTS, settings.max_keep_checkpoints))
    hp.checkpoint_every_steps = max(1, math.ceil(train_rows / (hp.batch_size * hp.gradient_accumulation_steps)))
    hp.keep_checkpoints = keep
    hp.checkpoint_adapters = keep


def create_job(session: Session, settings: Settings, tenant_id: str, raw: dict[str, Any]) -> Job:
    """Map the OpenAI body onto a JobSpec and submit it through the native service (same checks, same row)."""
    body = parse_job_create(raw)
    if body.integrations:
        raise BadRequest("integrations (wandb) are not supported here", param="integrations")
    objective, hp, param_root = _resolve_hyperparameters(body)
    grader = _reinforcement_grader(body) if objective == "grpo" else None
    if body.seed is not None:
        hp.seed = body.seed
    dataset = get_file_dataset(session, tenant_id, body.training_file, param="training_file")
    validation = None
    if body.validation_file is not None:
        if objective != "sft":
            raise BadRequest(
                f"validation_file applies to method.type supervised here, not {TYPE_OF_OBJECTIVE[objective]}",
                param="validation_file",
                code="unsupported_field",
            )
        validation = get_file_dataset(session, tenant_id, body.validation_file, param="validation_file").id
    _checkpoint_hyperparameters(settings, hp, dataset.train_rows)
    init_adapter = None
    base_model: str | None = body.model
    if body.model.startswith("ft:"):
        init_adapter = adapter_of_model(session, tenant_id, body.model, param="model")
        base_model = None
    try:
        spec = JobSpec(
            dataset_id=dataset.id,
            base_model=base_model,
            method=body.peft or "lora",
            objective=objective,
            init_adapter=init_adapter,
            grader=grader,
            hyperparameters=hp,
            suffix=body.suffix,
            validation_dataset_id=validation,
            metadata=body.metadata,
        )
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"{param}: {first['msg']}", param=param) from None
    try:
        job, _ = jobs_service.create_job(session, settings, tenant_id, spec)
    except InvalidInput as e:
        param = e.param or ""
        if param.startswith("hyperparameters."):
            param = param_root + param.removeprefix("hyperparameters")
        mapped = PARAM_OF_NATIVE.get(param, param or None)
        raise as_bad_request(InvalidInput(e.message, param=mapped, code=e.code)) from None
    return job


METADATA_QUERY = "metadata["
MAX_METADATA_PAIRS = 16


def metadata_filter(query: list[tuple[str, str]]) -> dict[str, str]:
    """OpenAI's list filter `metadata[k]=v` from the query string; other parameters are the route's."""
    pairs = {
        key[len(METADATA_QUERY) : -1]: value
        for key, value in query
        if key.startswith(METADATA_QUERY) and key.endswith("]")
    }
    if len(pairs) > MAX_METADATA_PAIRS or any(len(k) > 64 or len(v) > 512 for k, v in pairs.items()):
        raise BadRequest(
            f"metadata: at most {MAX_METADATA_PAIRS} pairs, keys up to 64 characters, values up to 512",
            param="metadata",
        )
    return pairs


def list_jobs(
    session: Session, tenant_id: str, *, limit: int, after: str | None, query: list[tuple[str, str]]
) -> tuple[list[FineTuningJob], bool]:
    metadata = metadata_filter(query)
    rows, has_more = jobs_repo.list_jobs(session, tenant_id, limit=limit, after=after, metadata=metadata)
    return [job_of(j) for j in rows], has_more


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


def resolved_hyperparameters(job: Job) -> JobHyperparameters:
    """The job's hyperparameters as OpenAI names them, every "auto" resolved to what it trains with."""
    hp = Hyperparameters.model_validate(job.hyperparameters or {})
    n_epochs = hp.n_epochs
    return JobHyperparameters(
        batch_size=hp.batch_size,
        learning_rate_multiplier=hp.learning_rate / _default_learning_rate(),
        n_epochs=int(n_epochs) if n_epochs is not None and float(n_epochs).is_integer() else n_epochs,
        beta=hp.knob("dpo", "beta") if job.objective == "dpo" else None,
    )


def job_of(job: Job) -> FineTuningJob:
    seed = (job.hyperparameters or {}).get("seed", 0)
    resolved = resolved_hyperparameters(job)
    kind = TYPE_OF_OBJECTIVE.get(job.objective or "sft")
    method = None
    if kind is not None:
        section: dict[str, Any] = {"hyperparameters": resolved.model_dump(exclude_none=True)}
        if kind == "reinforcement" and job.grader is not None:
            section["grader"] = job.grader
        method = {"type": kind, kind: section}
    error = None
    if job.error_code is not None:
        param = {"dataset_id": "training_file", "file": "training_file"}.get(job.error_param or "", job.error_param)
        error = JobError(code=job.error_code, message=job.error_message or "", param=param)
    eta = JobOut.of(job).progress.eta_seconds
    return FineTuningJob(
        id=job.id,
        created_at=unix(job.created_at) or 0,
        error=error,
        fine_tuned_model=fine_tuned_model(job),
        finished_at=unix(job.finished_at),
        hyperparameters=resolved,
        model=job.base_model,
        organization_id=job.tenant_id,
        result_files=[results_file_id(job.id)] if job.status == JobStatus.succeeded else [],
        seed=int(seed),
        status=STATUS_OF.get(job.status.value, job.status.value),
        trained_tokens=job.train_tokens,
        training_file=file_id(job.dataset_id),
        validation_file=file_id(job.validation_dataset_id) if job.validation_dataset_id else None,
        estimated_finish=int(time.time() + eta) if eta is not None else None,
        metadata=job.metadata_,
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


def event_metrics(e: JobEvent) -> dict[str, Any]:
    """A metrics event's numbers under OpenAI's names (train_loss, valid_loss, ...); None values left out."""
    data: dict[str, Any] = {"step": e.step, "train_loss": e.loss, "learning_rate": e.learning_rate, "epoch": e.epoch}
    for key, value in (e.metrics or {}).items():
        data[f"train_{key}" if key == "mean_token_accuracy" else key] = value
    return {k: v for k, v in data.items() if v is not None}


def event_of(e: JobEvent) -> FineTuningJobEvent:
    level = {"warning": "warn", "warn": "warn", "error": "error"}.get(e.level, "info")
    is_metrics = e.kind == "metrics"
    return FineTuningJobEvent(
        id=f"{EVENT_PREFIX}{e.id}",
        created_at=unix(e.created_at) or 0,
        level=level,
        message=e.message or (f"Step {e.step}: training loss={e.loss}" if is_metrics else ""),
        type="metrics" if is_metrics else "message",
        data=event_metrics(e) if is_metrics else None,
    )


# --- step metrics: the results file and each checkpoint's metrics, read from the job's metrics events -------------

RESULT_COLUMNS = (
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)
RESULTS_PREFIX = "file-results-"


def step_metrics(session: Session, job: Job) -> dict[int, dict[str, float]]:
    """OpenAI's per-step metrics of a job, by step: its training and validation events merged (the last validation
    pass, over the whole validation file, is also its full_valid_* figures)."""
    by_step: dict[int, dict[str, float]] = {}
    last_valid: dict[str, float] = {}
    for e in jobs_repo.metrics_events(session, job.id):
        if e.step is None:
            continue
        row = by_step.setdefault(e.step, {"step": float(e.step)})
        values = event_metrics(e)
        row.update({k: float(v) for k, v in values.items() if k in RESULT_COLUMNS and k != "step"})
        if "valid_loss" in values:
            last_valid = {"step": float(e.step), **{k: v for k, v in values.items() if k.startswith("valid_")}}
    if last_valid and job.status == JobStatus.succeeded:
        final = by_step[int(last_valid["step"])]
        for key in ("valid_loss", "valid_mean_token_accuracy"):
            if key in last_valid:
                final[f"full_{key}"] = float(last_valid[key])
    return by_step


def results_file_id(job_id: str) -> str:
    return RESULTS_PREFIX + job_id.removeprefix("ftjob-")


def results_job(session: Session, tenant_id: str, file_id_: str, *, param: str = "file_id") -> Job | None:
    """The succeeded job whose results file this is; None when the id is not a results file's; another tenant's or
    an unknown job's is a 404."""
    if not file_id_.startswith(RESULTS_PREFIX):
        return None
    job = jobs_repo.get_owned_job(session, tenant_id, "ftjob-" + file_id_.removeprefix(RESULTS_PREFIX))
    if job is None or job.status != JobStatus.succeeded:
        raise NotFound(f"no file with id {file_id_!r}", param=param)
    return job


def results_csv(session: Session, job: Job) -> bytes:
    """The results file: one row per logged step, OpenAI's columns; a figure not measured is empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for step, row in sorted(step_metrics(session, job).items()):
        writer.writerow([step, *(("" if row.get(c) is None else f"{row[c]:.6g}") for c in RESULT_COLUMNS[1:])])
    return out.getvalue().encode()


def results_file_of(session: Session, job: Job) -> FileObject:
    return FileObject(
        id=results_file_id(job.id),
        bytes=len(results_csv(session, job)),
        created_at=unix(job.finished_at) or unix(job.created_at) or 0,
        filename="step_metrics.csv",
        purpose="fine-tune-results",
    )


def list_results_files(
    session: Session, tenant_id: str, *, limit: int, after: str | None
) -> tuple[list[FileObject], bool]:
    """The results files of the tenant's succeeded jobs, newest first."""
    after_job = "ftjob-" + after.removeprefix(RESULTS_PREFIX) if after and after.startswith(RESULTS_PREFIX) else None
    jobs, has_more = jobs_repo.list_jobs(session, tenant_id, limit=limit, after=after_job, status=JobStatus.succeeded)
    return [results_file_of(session, j) for j in jobs], has_more


def list_checkpoints(
    session: Session, settings: Settings, tenant_id: str, job_id: str
) -> list[FineTuningJobCheckpoint]:
    """The job's checkpoints, newest first, named as OpenAI names them: once the job succeeded, those published as
    models (servable, and a `model` to continue from); before, the resumable ones on disk."""
    job = jobs_service.get_job_or_404(session, tenant_id, job_id)
    steps: list[tuple[int, int]] = []  # (step, created_at)
    if job.status == JobStatus.succeeded and job.adapter_name is not None:
        for adapter in adapters_repo.list_checkpoint_adapters(
            session, tenant_id, job.adapter_name, core_checkpoints.CHECKPOINT_ADAPTER_MARK
        ):
            step = core_checkpoints.checkpoint_adapter_step(job.adapter_name, adapter.name)
            if step is not None:
                steps.append((step, unix(adapter.created_at) or 0))
    else:
        steps = [
            (c.step, int(c.created_at.timestamp()))
            for c in core_checkpoints.list_checkpoints(settings, job_id)
            if c.complete
        ]
    metrics = step_metrics(session, job)
    name = f"ft:{job.base_model}:{job.tenant_id}:{job.suffix or ''}:{job.id}"
    return [
        FineTuningJobCheckpoint(
            id=f"{CHECKPOINT_PREFIX}{job.id.removeprefix('ftjob-')}-{step}",
            created_at=created,
            fine_tuned_model_checkpoint=f"{name}{CHECKPOINT_MARK}{step}",
            fine_tuning_job_id=job.id,
            metrics=_checkpoint_metrics(metrics, step),
            step_number=step,
        )
        for step, created in sorted(steps, reverse=True)
    ]


def _checkpoint_metrics(metrics: dict[int, dict[str, float]], step: int) -> dict[str, float | None]:
    """The figures logged at the checkpoint's step, or the latest before it."""
    logged = [s for s in metrics if s <= step]
    row = dict(metrics[max(logged)]) if logged else {}
    row["step"] = float(step)
    return {c: row.get(c) for c in RESULT_COLUMNS}


# --- models ---------------------------------------------------------------------------------------------------


def listed_models(session: Session, settings: Settings, tenant_id: str) -> list[Model]:
    """/v1/models: the base (and its aliases), then the tenant's servable adapters, each under its own name and, for
    a job's adapter or published checkpoint, its ft: name too."""
    now = int(time.time())
    models = [Model(id=settings.served_model_name, created=now, owned_by="tuneserve")]
    models += [Model(id=alias, created=now, owned_by="tuneserve") for alias in settings.model_alias_map]
    adapters = adapters_repo.list_servable_adapters(session, tenant_id)
    mark = core_checkpoints.CHECKPOINT_ADAPTER_MARK
    owners = jobs_repo.jobs_by_adapter(
        session, tenant_id, sorted({a.name.rsplit(mark, 1)[0] for a in adapters} | {a.name for a in adapters})
    )
    for adapter in adapters:
        created = unix(adapter.created_at) or now
        models.append(Model(id=adapter.name, created=created, owned_by=tenant_id))
        base_name = adapter.name.rsplit(mark, 1)[0]
        job = owners.get(adapter.name) or owners.get(base_name)
        ft_name = fine_tuned_model(job) if job is not None else None
        if job is None or ft_name is None:
            continue
        step = core_checkpoints.checkpoint_adapter_step(job.adapter_name or "", adapter.name)
        models.append(
            Model(
                id=ft_name if step is None else f"{ft_name}{CHECKPOINT_MARK}{step}", created=created, owned_by=tenant_id
            )
        )
    return models


def model_of(session: Session, settings: Settings, tenant_id: str, model: str) -> Model:
    """models.retrieve: the base, or the tenant's ft: model or adapter; anything else (another tenant's) a 404."""
    if settings.names_base_model(model):
        return Model(id=model, created=0, owned_by="tuneserve")
    name = adapter_of_model(session, tenant_id, model) if model.startswith("ft:") else model
    adapter = adapters_repo.get_owned_adapter(session, tenant_id, name)
    if adapter is None or adapter.status == AdapterStatus.deleted:
        raise NotFound(f"no model named {model!r}", param="model")
    return Model(id=model, created=unix(adapter.created_at) or 0, owned_by=tenant_id)


def deletable_adapter(session: Session, settings: Settings, tenant_id: str, model: str) -> str:
    """The adapter models.delete removes; the base model is a 400 (it is the deployment's, not a tenant's)."""
    if settings.names_base_model(model):
        raise BadRequest(
            f"{model!r} is the deployment's base model; only fine-tuned models can be deleted", param="model"
        )
    name = adapter_of_model(session, tenant_id, model) if model.startswith("ft:") else model
    session.commit()  # the lookup's transaction ends before the deletion takes its own
    return name
