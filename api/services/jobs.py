"""Job submission and control: validate, commit the row, and only then send its id to the workers."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.services import idempotency as idempotency_service
from api.services import usage as usage_service
from api.services.adapters import live_adapter_or_404
from api.services.datasets import get_dataset_or_404
from core.dataset_formats import OBJECTIVES_BY_FORMAT
from core.errors import Conflict, InvalidInput, NotFound
from core.graders import check_encodable, parse_grader
from core.jobspec import ATTENTION_MODULES, LORA_METHODS, JobSpec
from core.model_info import check_target_modules
from core.models import Adapter, AdapterStatus, Dataset, Job, JobEvent, JobStatus, TrainingMethod, new_id
from core.queue import commit_and_send
from core.repository import datasets as datasets_repo
from core.repository import jobs as jobs_repo
from core.repository import leases
from core.settings import Settings


def resolve_base_model(settings: Settings, requested: str | None) -> str:
    """One base model per deployment (serving batches adapters over it); accept its path or served name."""
    if requested is None or settings.names_base_model(requested):
        return settings.served_model_name
    raise InvalidInput(
        f"base_model {requested!r} is not served here; use {settings.served_model_name!r}", param="base_model"
    )


def create_job(
    session: Session, settings: Settings, tenant_id: str, spec: JobSpec, *, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """Validate, commit the job, send it; returns the job and whether an earlier request (same Idempotency-Key) made it."""
    # The parsed body, so key order, whitespace and spelled-out defaults do not make another request.
    idempotency = idempotency_service.idempotent_request(
        tenant_id,
        "POST /jobs",
        idempotency_key,
        spec.model_dump(mode="json"),
        ttl_seconds=settings.idempotency_key_ttl_seconds,
    )
    if idempotency is not None and (earlier := idempotency_service.earlier_resource(session, idempotency)):
        return get_job_or_404(session, tenant_id, earlier), True
    hp = spec.hyperparameters
    hp.check_limits(settings, spec.method)
    spec.evaluation.check_max_examples(settings, param="evaluation.max_examples")
    hp.check_objective(spec.objective, method=spec.method, init_adapter=spec.init_adapter)
    grader = check_grader(spec)
    if isinstance(hp.target_modules, list):
        check_target_modules(settings.base_model, hp.target_modules)
    base_model = resolve_base_model(settings, spec.base_model)
    dataset = get_dataset_or_404(session, tenant_id, spec.dataset_id)
    check_dataset_fits(dataset, spec.objective)
    hp.check_steps(settings, dataset.train_rows)
    # JSON's \u escapes can spell strings (lone surrogates) that no database text holds.
    check_encodable({"metadata": spec.metadata, "validation_dataset_id": spec.validation_dataset_id}, "")
    check_validation_dataset(session, tenant_id, spec)
    if spec.init_adapter is not None:
        adapter = live_adapter_or_404(session, tenant_id, spec.init_adapter, param="init_adapter")
        adopt_init_adapter(spec, adapter, base_model)
    job_id = new_id("ftjob")
    if idempotency is not None and (winner := idempotency_service.claim_key(session, idempotency, job_id)):
        return get_job_or_404(session, tenant_id, winner), True
    job = jobs_repo.add_job(
        session,
        Job(
            id=job_id,
            tenant_id=tenant_id,
            base_model=base_model,
            dataset_id=spec.dataset_id,
            method=TrainingMethod(spec.method),
            objective=spec.objective,
            init_adapter=spec.init_adapter,
            grader=grader,
            hyperparameters=spec.hyperparameters.model_dump(mode="json"),
            suffix=spec.suffix,
            evaluation=spec.evaluation.model_dump(mode="json"),
            validation_dataset_id=spec.validation_dataset_id,
            metadata_=spec.metadata,
            status=JobStatus.queued,
            max_attempts=settings.max_attempts,
        ),
    )
    admit_job(session, settings, tenant_id)
    jobs_repo.add_event(session, JobEvent(job_id=job.id, kind="status", message="job queued"))
    commit_and_send(session, settings, Job, job.id)
    return job, False


def check_grader(spec: JobSpec) -> dict[str, Any] | None:
    """GRPO's grader, validated (a bad regex or schema is a 422 naming it); no other objective takes one."""
    if spec.objective != "grpo":
        if spec.grader is not None:
            raise InvalidInput(f"grader applies to objective grpo, not {spec.objective}", param="grader")
        return None
    if spec.grader is None:
        raise InvalidInput("objective grpo needs a grader (what rewards a completion)", param="grader")
    return dict(parse_grader(spec.grader).model_dump(mode="json", by_alias=True, exclude_none=True))


def check_validation_dataset(session: Session, tenant_id: str, spec: JobSpec) -> None:
    """The held-out rows whose loss training reports: the tenant's dataset, supervised rows, an sft job."""
    if spec.validation_dataset_id is None:
        return
    if spec.objective != "sft":
        raise InvalidInput(
            f"validation_dataset_id applies to objective sft, not {spec.objective}", param="validation_dataset_id"
        )
    dataset = datasets_repo.get_owned_dataset(session, tenant_id, spec.validation_dataset_id)
    if dataset is None:
        raise NotFound(f"no dataset with id {spec.validation_dataset_id!r}", param="validation_dataset_id")
    try:
        check_dataset_fits(dataset, "sft")
    except InvalidInput as e:
        raise InvalidInput(e.message, param="validation_dataset_id", code=e.code) from None


def check_dataset_fits(dataset: Dataset, objective: str) -> None:
    """A job's objective must be one its dataset's rows can feed (preference pairs for DPO, say)."""
    feeds = dataset.objectives or list(OBJECTIVES_BY_FORMAT.get(dataset.format, ("sft", "grpo")))
    if objective not in feeds:
        raise InvalidInput(
            f"dataset {dataset.id} holds {dataset.format} rows, which feed {', '.join(feeds)}, not {objective}",
            param="objective",
            code="dataset_objective_mismatch",
        )


def adopt_init_adapter(spec: JobSpec, adapter: Adapter, base_model: str) -> None:
    """Check the starting adapter against the job and take its rank, alpha and targets (422 naming a conflict)."""
    hp = spec.hyperparameters
    if adapter.status != AdapterStatus.ready:
        raise InvalidInput(f"init_adapter {adapter.name!r} is {adapter.status.value}", param="init_adapter")
    if adapter.base_model != base_model:
        raise InvalidInput(
            f"init_adapter {adapter.name!r} was made for base model {adapter.base_model!r}, not {base_model!r}",
            param="init_adapter",
        )
    if adapter.method not in LORA_METHODS or adapter.rank is None:
        raise InvalidInput(
            f"init_adapter must be a LoRA adapter; {adapter.name!r} is {adapter.method}", param="init_adapter"
        )
    # QLoRA trains plain LoRA weights on a quantised base, so the two continue each other; DoRA adds magnitudes.
    if (adapter.method == "dora") != (spec.method == "dora"):
        raise InvalidInput(
            f"init_adapter {adapter.name!r} is a {adapter.method} adapter; method {spec.method} cannot continue it",
            param="method",
        )
    if "lora_r" in hp.model_fields_set and hp.lora_r != adapter.rank:
        raise InvalidInput(
            f"lora_r {hp.lora_r} conflicts with init_adapter {adapter.name!r} (rank {adapter.rank}); leave it out",
            param="hyperparameters.lora_r",
        )
    if "lora_alpha" in hp.model_fields_set and adapter.alpha is not None and hp.lora_alpha != adapter.alpha:
        raise InvalidInput(
            f"lora_alpha {hp.lora_alpha:g} conflicts with init_adapter {adapter.name!r} (alpha {adapter.alpha:g})",
            param="hyperparameters.lora_alpha",
        )
    if "target_modules" in hp.model_fields_set:
        wanted = hp.target_modules
        asked = ATTENTION_MODULES if wanted == "attention" else wanted
        if asked == "all-linear" or sorted(asked) != sorted(adapter.target_modules):
            raise InvalidInput(
                f"target_modules {wanted!r} conflict with init_adapter {adapter.name!r} "
                f"({', '.join(adapter.target_modules)}); leave them out",
                param="hyperparameters.target_modules",
            )
    # Stored on the job, so the row says what it trains (the worker reads the adapter's own config for the rest).
    hp.lora_r = adapter.rank
    if adapter.alpha is not None:
        hp.lora_alpha = adapter.alpha
    hp.target_modules = list(adapter.target_modules)


def admit_job(session: Session, settings: Settings, tenant_id: str) -> None:
    """Refuse the job just inserted (the rollback leaves nothing): 429 past max_active_jobs, 413 at the storage
    quota or past max_adapters_per_tenant.

    Counted after the insert and under the admission lock, so concurrent submissions cannot all slip in.
    """
    usage_service.admit(session, settings, tenant_id, "job")


def get_job_or_404(session: Session, tenant_id: str, job_id: str) -> Job:
    job = jobs_repo.get_owned_job(session, tenant_id, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id!r}", param="job_id")
    return job


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = get_job_or_404(session, tenant_id, job_id)
    if job.status.is_terminal:
        raise Conflict(f"job {job_id} is already {job.status.value}", param="job_id", code="job_finished")
    leases.request_cancel(session, Job, job_id)
    jobs_repo.add_event(session, JobEvent(job_id=job_id, kind="status", message="cancel requested"))
    return get_job_or_404(session, tenant_id, job_id)
