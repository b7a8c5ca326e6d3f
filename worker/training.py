"""The training child process: one attempt of one job, with transformers + peft.

Run as `python -m worker.training JOB_ID OWNER` (or under torchrun for DDP). It writes progress and
events to SQL, stops at the cancel flag, checkpoints every N steps and resumes from the last complete
checkpoint, saves the adapter atomically into the store and registers it in the same transaction that
marks the job succeeded (only while it still holds the lease). Exit codes: 0 when the job reached a
terminal state, EXIT_TRANSIENT when another attempt may succeed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from core.chat import IGNORE_INDEX, encode_for_training
from core.checkpoints import (
    checkpoint_adapter_name,
    checkpoints_dir,
    latest_complete,
    list_checkpoints,
    mark_complete,
)
from core.dataset_formats import Row, as_messages
from core.db import session_scope
from core.errors import TrainingError
from core.job_evaluations import plan_job_evaluations
from core.jobspec import LORA_METHODS, Hyperparameters
from core.logs import setup_logging
from core.models import Adapter, AdapterStatus, Job, JobEvent, JobStatus
from core.repository import adapters as adapters_repo
from core.repository import job_control, leases
from core.repository import jobs as jobs_repo
from core.settings import Settings, get_settings
from core.storage import Store, hash_dir
from worker.collators import PackingCollator, PaddingCollator
from worker.distributed import trainer_distributed_arguments
from worker.peft_methods import (
    load_base_model,
    load_init_adapter,
    servability,
    trained_target_modules,
    wrap_for_method,
)
from worker.publishing import LeaseLost, publish_under_lease

EXIT_TRANSIENT = 75  # EX_TEMPFAIL
log = logging.getLogger("tuneserve.training")
# Our optimizer names -> transformers' `optim` names.
OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adafactor": "adafactor",
    "sgd": "sgd",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
}
STOP_CANCEL, STOP_LEASE_LOST, STOP_PAUSE = 1, 2, 4


def adapter_name_for(job: Job) -> str:
    return f"ft-{job.suffix or job.method.value.replace('_', '-')}-{job.id.split('-', 1)[1]}"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def load_records(store: Store, dataset_path: str, split: str) -> list[Row]:
    """A split's rows as stored: chat messages, or preference / unpaired objects (core.dataset_formats)."""
    path = store.resolve(dataset_path) / f"{split}.jsonl"
    if not path.exists():
        raise TrainingError(
            "dataset_missing", f"the dataset's {split} split is missing from the store", param="dataset_id"
        )
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [r["messages"] if "messages" in r else r for r in records]


def load_rows(store: Store, dataset_path: str, split: str) -> list[list[dict[str, str]]]:
    """A split as conversations: a pair's prompt and chosen answer; an unpaired row only when desirable."""
    return [as_messages(r) for r in load_records(store, dataset_path, split) if _desirable(r)]


def _desirable(row: Row) -> bool:
    return isinstance(row, list) or bool(row.get("label", True))


def training_command(settings: Settings, job_id: str, owner: str) -> list[str]:
    """How the supervisor starts a job's child: plain, or under torchrun for DDP."""
    with session_scope(settings.database_url) as s:
        job = jobs_repo.get_job(s, job_id)
        distributed = (job.hyperparameters or {}).get("distributed") if job else None
    if distributed and distributed.get("num_processes", 1) > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={distributed['num_processes']}",
            "-m",
            "worker.ddp_rank",  # worker.training's main, dying with torchrun from its first line
            job_id,
            owner,
        ]
    return [sys.executable, "-m", "worker.training", job_id, owner]


class Attempt:
    """Everything one attempt needs to talk to SQL; only the main process of a DDP group writes."""

    def __init__(self, settings: Settings, job_id: str, owner: str, attempt: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.owner = owner
        self.attempt = attempt
        self.main = is_main_process()

    def event(self, message: str, *, kind: str = "message", level: str = "info", **metrics: Any) -> None:
        if not self.main:
            return
        try:
            with session_scope(self.settings.database_url) as s:
                jobs_repo.add_event(
                    s,
                    JobEvent(
                        job_id=self.job_id, kind=kind, level=level, attempt=self.attempt, message=message, **metrics
                    ),
                )
        except SQLAlchemyError:
            log.warning("job %s: could not write an event (database unreachable); going on", self.job_id)

    def progress(self, step: int, total: int | None, loss: float | None) -> bool:
        if not self.main:
            return True
        try:
            with session_scope(self.settings.database_url) as s:
                return jobs_repo.record_progress(
                    s, self.job_id, owner=self.owner, step=step, total_steps=total, loss=loss
                )
        except SQLAlchemyError:
            # A brief database outage must not end the attempt: the supervisor stops this child before the lease
            # could expire, and nothing is published without the lease (worker.publishing).
            log.warning("job %s: could not record progress (database unreachable); going on", self.job_id)
            return True

    def stop_requested(self) -> int:
        """STOP_CANCEL and/or STOP_PAUSE, as the job's flags in SQL ask."""
        try:
            with session_scope(self.settings.database_url) as s:
                row = s.execute(select(Job.cancel_requested, Job.pause_requested).where(Job.id == self.job_id)).first()
        except SQLAlchemyError:
            return 0  # asked again at the next step
        if row is None:
            return 0
        return (STOP_CANCEL if row[0] else 0) | (STOP_PAUSE if row[1] else 0)

    def pause(self) -> bool:
        """The job paused at its last checkpoint (the lease released, the worker free); False if not ours any more."""
        if not self.main:
            return True
        with session_scope(self.settings.database_url) as s:
            return job_control.settle_pause(s, self.job_id, owner=self.owner, attempt=self.attempt)

    def finish(self, status: JobStatus, *, error: TrainingError | None = None) -> None:
        if not self.main:
            return
        with session_scope(self.settings.database_url) as s:
            if not leases.finish(
                s,
                Job,
                self.job_id,
                owner=self.owner,
                status_name=status.value,
                error=(error.code, error.message, error.param) if error else None,
            ):
                return  # another attempt owns the job now: its outcome is not ours to write
            jobs_repo.add_event(
                s,
                JobEvent(
                    job_id=self.job_id,
                    kind="status",
                    level="error" if error else "info",
                    attempt=self.attempt,
                    message=f"job {status.value}" + (f": {error.message}" if error else ""),
                ),
            )


def _agree_on_stop(flag: int) -> int:
    """Every DDP rank must stop at the same step, or the others hang in their next all-reduce."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    import torch

    tensor = torch.tensor([flag], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def _make_callback(attempt: Attempt):
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Loss events every few steps, the cancel flag every step, checkpoints marked complete."""

        stop_reason = 0
        pending_flag = 0

        def on_train_begin(self, args, state, control, **kwargs):
            attempt.progress(state.global_step, state.max_steps, None)

        def on_step_end(self, args, state, control, **kwargs):
            flag = self.pending_flag | attempt.stop_requested()
            flag = _agree_on_stop(flag)
            if flag:
                self.stop_reason = flag
                control.should_training_stop = True
                # A pause alone saves a checkpoint at this step, the one resume continues from.
                control.should_save = flag == STOP_PAUSE
            return control

        def on_save(self, args, state, control, **kwargs):
            if attempt.main:
                mark_complete(
                    checkpoints_dir(attempt.settings, attempt.job_id) / f"checkpoint-{state.global_step}",
                    state.global_step,
                )
                attempt.event(f"checkpoint saved at step {state.global_step}", step=state.global_step)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            values = validation_metrics(metrics or {})
            if values and attempt.main:
                attempt.event(
                    f"step {state.global_step}: validation loss {values.get('valid_loss', float('nan')):.4f}",
                    kind="metrics",
                    step=state.global_step,
                    epoch=float(state.epoch or 0.0),
                    metrics=values,
                )

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is None or not attempt.main:
                return
            if not attempt.progress(state.global_step, state.max_steps, float(loss)):
                self.pending_flag |= STOP_LEASE_LOST  # acted on at the next step end, by every rank together
                return
            metrics = trainer_metrics(logs)
            attempt.event(
                f"step {state.global_step}/{state.max_steps}: loss {loss:.4f}" + metrics_summary(metrics),
                kind="metrics",
                step=state.global_step,
                epoch=float(logs.get("epoch", state.epoch or 0.0)),
                loss=float(loss),
                learning_rate=float(logs.get("learning_rate", 0.0)),
                metrics=metrics or None,
            )

    return ProgressCallback()


# Logged values that have their own event columns.
_EVENT_COLUMNS = frozenset({"loss", "learning_rate", "epoch"})
# What an event's message shows beside the loss, when the trainer logged it.
_SUMMARY = (
    ("rewards/margins", "margin"),
    ("rewards/accuracies", "accuracy"),
    ("reward", "reward"),
    ("kl", "kl"),
)


def trainer_metrics(logs: dict[str, Any]) -> dict[str, float]:
    """The numbers a trainer logged at a step, besides loss, learning rate and epoch (finite ones: JSON holds no NaN)."""
    import math

    return {
        k: float(v)
        for k, v in logs.items()
        if k not in _EVENT_COLUMNS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def validation_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The Trainer's eval_* numbers as a job reports them: eval_loss is valid_loss (OpenAI's name), and so on."""
    out = trainer_metrics(metrics)
    return {f"valid_{k.removeprefix('eval_')}": v for k, v in out.items() if k in VALIDATION_METRICS}


# What a validation pass reports (the Trainer's runtime and throughput numbers are left out).
VALIDATION_METRICS = frozenset({"eval_loss", "eval_mean_token_accuracy"})


def argmax_logits(logits: Any, _labels: Any) -> Any:
    """Keep each position's predicted token, not the whole vocabulary's logits, across the validation pass."""
    return logits.argmax(dim=-1)


def mean_token_accuracy(eval_prediction: Any) -> dict[str, float]:
    """The share of label tokens predicted exactly (the prediction at t is for the token at t + 1)."""
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    predictions = predictions[:, -labels.shape[1] :]  # prompt learning's virtual tokens come first
    mask = labels[:, 1:] != IGNORE_INDEX
    hits = (predictions[:, :-1] == labels[:, 1:]) & mask
    return {"mean_token_accuracy": float(hits.sum() / max(int(mask.sum()), 1))}


def metrics_summary(metrics: dict[str, float]) -> str:
    return "".join(f", {label} {metrics[key]:.4f}" for key, label in _SUMMARY if key in metrics)


def encode_rows(tokenizer: Any, rows: list, hp: Hyperparameters) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids and labels of every row that still has a label after truncation; and how many were truncated."""
    encoded = [
        encode_for_training(tokenizer, m, max_length=hp.max_seq_length, completion_only=hp.completion_only_loss)
        for m in rows
    ]
    examples = [
        {"input_ids": e.input_ids, "labels": e.labels} for e in encoded if any(t != IGNORE_INDEX for t in e.labels)
    ]
    return examples, sum(e.truncated for e in encoded)


def training_arguments(
    hp: Hyperparameters,
    *,
    output_dir: str,
    logging_steps: int,
    use_cpu: bool,
    distributed: bool,
    evaluate: bool = False,
) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        **training_argument_values(
            hp,
            output_dir=output_dir,
            logging_steps=logging_steps,
            use_cpu=use_cpu,
            distributed=distributed,
            evaluate=evaluate,
        )
    )


def training_argument_values(
    hp: Hyperparameters,
    *,
    output_dir: str,
    logging_steps: int,
    use_cpu: bool,
    distributed: bool,
    evaluate: bool = False,
) -> dict[str, Any]:
    """Our knobs as TrainingArguments' keywords; TRL's configs (DPOConfig, ...) extend TrainingArguments and take them too.

    evaluate: a validation pass every logging_steps steps (the job's validation dataset)."""
    return dict(
        eval_strategy="steps" if evaluate else "no",
        eval_steps=logging_steps if evaluate else None,
        per_device_eval_batch_size=hp.batch_size,
        output_dir=output_dir,
        per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.n_epochs or 1,
        max_steps=hp.max_steps or -1,
        lr_scheduler_type=hp.lr_scheduler_type,
        warmup_steps=hp.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=hp.weight_decay,
        optim=OPTIMIZERS[hp.optimizer],
        bf16=hp.precision == "bf16",
        fp16=hp.precision == "fp16",
        gradient_checkpointing=hp.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if hp.gradient_checkpointing else None,
        logging_steps=logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=hp.checkpoint_every_steps,
        save_total_limit=hp.keep_checkpoints,
        report_to=[],
        seed=hp.seed,
        data_seed=hp.seed,
        use_cpu=use_cpu,
        ddp_backend=("gloo" if use_cpu else "nccl") if distributed else None,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        **trainer_distributed_arguments(hp),
    )


def build_trainer(
    *,
    base_model: str,
    method: str,
    hp: Hyperparameters,
    examples: list[dict[str, list[int]]],
    pad_token_id: int,
    output_dir: str,
    logging_steps: int,
    use_cpu: bool,
    callbacks: list[Any] | None = None,
    init_adapter_dir: str | None = None,
    eval_examples: list[dict[str, list[int]]] | None = None,
) -> tuple[Any, PaddingCollator | PackingCollator]:
    """The Trainer for a method and its knobs (also what bench/train.py measures)."""
    import torch
    from transformers import Trainer

    torch.manual_seed(hp.seed)
    model = trainable_model(base_model, method, hp, init_adapter_dir)
    collator: PaddingCollator | PackingCollator = PackingCollator() if hp.packing else PaddingCollator(pad_token_id)
    args = training_arguments(
        hp,
        output_dir=output_dir,
        logging_steps=logging_steps,
        use_cpu=use_cpu,
        distributed=int(os.environ.get("WORLD_SIZE", "1")) > 1,
        evaluate=bool(eval_examples),
    )
    validation: dict[str, Any] = {}
    if eval_examples:
        validation = {
            "eval_dataset": eval_examples,
            "compute_metrics": mean_token_accuracy,
            "preprocess_logits_for_metrics": argmax_logits,
        }
    trainer = _with_token_accuracy(Trainer)(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=collator,
        callbacks=callbacks or [],
        **validation,
    )
    return trainer, collator


def _with_token_accuracy(trainer_class: Any) -> Any:
    """The Trainer, also logging the training batches' mean token accuracy (OpenAI's train_mean_token_accuracy)
    beside each loss: the share of label tokens the model's argmax predicted, since the last log."""

    class TokenAccuracyTrainer(trainer_class):
        hits = 0
        counted = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            logits = getattr(outputs, "logits", None)
            labels = inputs.get("labels")
            if model.training and logits is not None and labels is not None and logits.dim() == 3:
                # Prompt learning (prompt/prefix/p-tuning) puts its virtual tokens' positions before the labels'.
                logits = logits[:, -labels.shape[1] :]
                predicted, target = logits[:, :-1].argmax(dim=-1), labels[:, 1:]
                mask = target != IGNORE_INDEX
                self.hits += int(((predicted == target) & mask).sum())
                self.counted += int(mask.sum())
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, start_time=None):
            if "loss" in logs and self.counted:
                logs["mean_token_accuracy"] = self.hits / self.counted
                self.hits = self.counted = 0
            super().log(logs, start_time)

    return TokenAccuracyTrainer


def trainable_model(base_model: str, method: str, hp: Hyperparameters, init_adapter_dir: str | None) -> Any:
    """The base model wrapped for the method: a fresh adapter, or the init_adapter's weights to continue."""
    base = load_base_model(base_model, method, hp)
    if init_adapter_dir is not None:
        return load_init_adapter(base, init_adapter_dir, method, hp)
    return wrap_for_method(base, method, hp)


def init_adapter_dir(settings: Settings, job: Job) -> str | None:
    """The job's starting adapter's directory, its files checked against their sha256 (None: a fresh adapter)."""
    if job.init_adapter is None:
        return None
    from worker.adapter_operations import verified_adapter_dir

    with session_scope(settings.database_url) as s:
        adapter = adapters_repo.get_adapter_by_name(s, job.init_adapter)
        if adapter is not None:
            s.expunge(adapter)
    if adapter is None or adapter.status not in (AdapterStatus.ready, AdapterStatus.deleted):
        raise TrainingError(
            "init_adapter_missing", f"init_adapter {job.init_adapter!r} is not available", param="init_adapter"
        )
    try:
        return str(verified_adapter_dir(Store(settings), adapter))
    except TrainingError as e:
        raise TrainingError(e.code, e.message, param="init_adapter") from None


def run_trainer(attempt: Attempt, job: Job, trainer: Any, callback: Any) -> float | None:
    """Train from the last complete checkpoint; the seconds it took, or None when it stopped early (cancelled: the job
    is settled here; lease lost: the job is another attempt's)."""
    checkpoint = latest_complete(attempt.settings, job.id)
    if checkpoint is not None:
        attempt.event(f"resuming from checkpoint at step {checkpoint.step}", step=checkpoint.step)
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(checkpoint.path) if checkpoint else None)
    elapsed = time.monotonic() - started
    if callback.stop_reason & STOP_LEASE_LOST:
        log.warning("job %s: lease lost, leaving the job to its new owner", job.id)
        return None
    if callback.stop_reason & STOP_CANCEL:
        attempt.finish(JobStatus.cancelled)
        return None
    if callback.stop_reason & STOP_PAUSE:
        # Not paused (a resume came first, or the lease went): the supervisor retries it from this checkpoint.
        attempt.pause()
        return None
    return elapsed


def train(attempt: Attempt, job: Job, dataset_path: str, validation_path: str | None = None) -> None:
    if job.objective != "sft":
        train_objective(attempt, job, dataset_path)
        return
    import torch
    from transformers import AutoTokenizer

    settings = attempt.settings
    hp = Hyperparameters.model_validate(job.hyperparameters)
    rows = load_rows(Store(settings), dataset_path, "train")

    tokenizer = AutoTokenizer.from_pretrained(settings.base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, truncated = encode_rows(tokenizer, rows, hp)
    if not examples:
        raise TrainingError(
            "no_trainable_tokens",
            "after truncation to max_seq_length no example has assistant tokens left; raise max_seq_length",
            param="hyperparameters.max_seq_length",
        )
    dataset_tokens = sum(len(e["input_ids"]) for e in examples)
    attempt.event(
        f"{len(examples)} training examples, {dataset_tokens} tokens, {truncated} truncated to {hp.max_seq_length} tokens"
    )
    eval_examples = None
    if validation_path is not None:
        # The validation dataset's own train split: its rows as uploaded (a file is one split).
        eval_examples, _ = encode_rows(tokenizer, load_rows(Store(settings), validation_path, "train"), hp)
        attempt.event(
            f"{len(eval_examples)} validation examples: validation loss every {settings.event_every_steps} steps"
        )

    callback = _make_callback(attempt)
    trainer, collator = build_trainer(
        base_model=settings.base_model,
        method=job.method.value,
        hp=hp,
        examples=examples,
        pad_token_id=tokenizer.pad_token_id,
        output_dir=str(checkpoints_dir(settings, job.id)),
        logging_steps=settings.event_every_steps,
        use_cpu=settings.training_device == "cpu" or not torch.cuda.is_available(),
        callbacks=[callback],
        init_adapter_dir=init_adapter_dir(settings, job),
        eval_examples=eval_examples,
    )
    model = trainer.model
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    elapsed = run_trainer(attempt, job, trainer, callback)
    if elapsed is None:
        return
    steps = trainer.state.global_step
    if eval_examples and steps % settings.event_every_steps:
        trainer.evaluate()  # the final step's validation loss, when the periodic pass did not land on it
    if not attempt.main:
        return
    attempt.progress(steps, steps, None)
    attempt.event(
        f"trained {steps} steps in {elapsed:.1f}s: {collator.real_tokens * world_size / max(elapsed, 1e-9):.0f} tokens/s, "
        f"{collator.real_tokens / max(collator.batch_tokens, 1):.0%} of computed tokens were not padding"
    )
    publish_adapter(attempt, job, model, tokenizer, hp, dataset_tokens)


def train_objective(attempt: Attempt, job: Job, dataset_path: str) -> None:
    """One attempt of a DPO, KTO, ORPO or GRPO job: TRL's trainer over our PEFT model, with the same callback (events,
    cancel, checkpoints), resume and publishing as supervised training."""
    import torch
    from transformers import AutoTokenizer

    from worker.objectives import build_objective_trainer, trl_rows

    settings = attempt.settings
    hp = Hyperparameters.model_validate(job.hyperparameters)
    records = load_records(Store(settings), dataset_path, "train")
    rows = trl_rows(job.objective, records)
    tokenizer = AutoTokenizer.from_pretrained(settings.base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    attempt.event(f"{len(rows)} {job.objective} training rows from {len(records)} dataset rows")

    method = job.method.value
    start_dir = init_adapter_dir(settings, job)
    torch.manual_seed(hp.seed)
    model = trainable_model(settings.base_model, method, hp, start_dir)
    # DPO's and KTO's frozen reference: the init_adapter when continuing one (unless asked otherwise), else the base.
    reference = hp.reference_model or ("init_adapter" if start_dir else "base")
    callback = _make_callback(attempt)
    arguments = training_argument_values(
        hp,
        output_dir=str(checkpoints_dir(settings, job.id)),
        logging_steps=settings.event_every_steps,
        use_cpu=settings.training_device == "cpu" or not torch.cuda.is_available(),
        distributed=False,
    )
    trainer = build_objective_trainer(
        objective=job.objective,
        model=model,
        reference=reference,
        tokenizer=tokenizer,
        hp=hp,
        rows=rows,
        arguments=arguments,
        grader=job.grader,
        callbacks=[callback],
    )
    elapsed = run_trainer(attempt, job, trainer, callback)
    if elapsed is None:
        return
    steps = trainer.state.global_step
    tokens = _logged_tokens(trainer)
    attempt.progress(steps, steps, None)
    attempt.event(
        f"trained {steps} {job.objective} steps in {elapsed:.1f}s"
        + (f": {tokens / max(elapsed, 1e-9):.0f} tokens/s" if tokens else "")
    )
    publish_adapter(attempt, job, trainer.model, tokenizer, hp, tokens)


def _logged_tokens(trainer: Any) -> int:
    """The tokens TRL counted (its num_tokens metric, cumulative), from the last log that has it."""
    for entry in reversed(trainer.state.log_history):
        if "num_tokens" in entry:
            return int(entry["num_tokens"])
    return 0


def publish_adapter(
    attempt: Attempt, job: Job, model: Any, tokenizer: Any, hp: Hyperparameters, train_tokens: int
) -> None:
    """Write the adapter to a staging dir, then, in one transaction under the job's lease: move it into place,
    register it, mark the job succeeded and plan its evaluations."""
    settings = attempt.settings
    store = Store(settings)
    name = adapter_name_for(job)
    target_modules = trained_target_modules(model, job.method.value)
    serve = servability(job.method.value, target_modules)
    lora = job.method.value in LORA_METHODS
    with store.staging_dir() as staged, ExitStack() as stack:
        checkpoints = stage_checkpoint_adapters(store, stack, attempt.settings, job, name, hp.checkpoint_adapters)
        if hasattr(model, "peft_config"):
            # Only the trained adapter: DPO and KTO add a frozen "ref" copy that is no part of the result.
            model.save_pretrained(str(staged), safe_serialization=True, selected_adapters=["default"])
        else:
            model.save_pretrained(str(staged), safe_serialization=True)
        if job.method.value == "full":
            tokenizer.save_pretrained(str(staged))  # a full model must stand on its own
        files, size = hash_dir(staged)
        try:
            with session_scope(settings.database_url) as s:
                relative = publish_under_lease(s, store, Job, job.id, attempt.owner, staged, name)
                published: list[tuple[str, str | None, str, dict[str, str], int]] = [
                    (name, job.id, relative, files, size)
                ]
                for checkpoint_name, checkpoint_dir, checkpoint_files, checkpoint_size in checkpoints:
                    checkpoint_relative = publish_under_lease(
                        s, store, Job, job.id, attempt.owner, checkpoint_dir, checkpoint_name
                    )
                    # job_id is the final adapter's alone (unique); a checkpoint is known by its name.
                    published.append((checkpoint_name, None, checkpoint_relative, checkpoint_files, checkpoint_size))
                leases.finish(
                    s,
                    Job,
                    job.id,
                    owner=attempt.owner,
                    status_name="succeeded",
                    adapter_name=name,
                    train_tokens=train_tokens,
                )
                for adapter_name, job_id, path, adapter_files, adapter_size in published:
                    adapters_repo.add_adapter(
                        s,
                        Adapter(
                            name=adapter_name,
                            tenant_id=job.tenant_id,
                            job_id=job_id,
                            base_model=job.base_model,
                            method=job.method.value,
                            rank=hp.lora_r if lora else None,
                            alpha=hp.lora_alpha if lora else None,
                            target_modules=target_modules,
                            path=path,
                            files=adapter_files,
                            size_bytes=adapter_size,
                            status=AdapterStatus.ready,
                            servable=serve.servable,
                            servable_reason=serve.reason,
                            parent_name=job.init_adapter,
                        ),
                    )
                jobs_repo.add_event(
                    s,
                    JobEvent(
                        job_id=job.id, kind="status", attempt=attempt.attempt, message=f"job succeeded: adapter {name}"
                    ),
                )
                plan_job_evaluations(s, settings, job, name)
        except LeaseLost:
            raise TrainingError("lease_lost", "another attempt owns this job now", transient=True) from None


CHECKPOINT_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def stage_checkpoint_adapters(
    store: Store, stack: ExitStack, settings: Settings, job: Job, name: str, count: int
) -> list[tuple[str, Path, dict[str, str], int]]:
    """The adapter files of the last `count` complete checkpoints, each copied to a staging dir (name, dir, files,
    bytes); the optimizer and trainer state stay behind, so each is an adapter like any other."""
    if count <= 0:
        return []
    complete = [c for c in list_checkpoints(settings, job.id) if c.complete][-count:]
    staged = []
    for checkpoint in complete:
        if not all((checkpoint.path / f).is_file() for f in CHECKPOINT_ADAPTER_FILES):
            continue  # a method whose checkpoints are not adapter files (full fine-tuning)
        directory = stack.enter_context(store.staging_dir())
        for file_name in CHECKPOINT_ADAPTER_FILES:
            shutil.copyfile(checkpoint.path / file_name, directory / file_name)
        files, size = hash_dir(directory)
        staged.append((checkpoint_adapter_name(name, checkpoint.step), directory, files, size))
    return staged


def run(job_id: str, owner: str) -> int:
    settings = get_settings()
    with session_scope(settings.database_url) as s:
        job = jobs_repo.get_job(s, job_id)
        if job is None or job.lease_owner != owner or job.status != JobStatus.running:
            return 0
        from core.repository.datasets import get_dataset

        dataset = get_dataset(s, job.dataset_id)
        dataset_path = dataset.path if dataset else ""
        validation = get_dataset(s, job.validation_dataset_id) if job.validation_dataset_id else None
        validation_path = validation.path if validation else None
        attempt = Attempt(settings, job_id, owner, job.attempt_count)
    try:
        train(attempt, job, dataset_path, validation_path)
        return 0
    except TrainingError as e:
        if e.transient:
            attempt.event(e.message, level="warning")
            return EXIT_TRANSIENT
        attempt.finish(JobStatus.failed, error=e)
        return 0
    except MemoryError as e:
        attempt.event(f"out of memory: {e}", level="warning")
        return EXIT_TRANSIENT
    except OperationalError:
        # The database went away (a dropped connection, a restart): another attempt may well succeed.
        log.warning("job %s: database error; leaving the job to a retry", job_id, exc_info=True)
        return EXIT_TRANSIENT
    except Exception as e:
        if "out of memory" in str(e).lower():
            attempt.event(f"out of memory: {e}", level="warning")
            return EXIT_TRANSIENT
        log.exception("training failed")
        attempt.finish(JobStatus.failed, error=TrainingError("training_error", f"{type(e).__name__}: {e}"))
        return 0


def main() -> None:
    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        code = run(sys.argv[1], sys.argv[2])
    except OperationalError:
        # Reading the job, or writing its end, failed on the database: transient, the supervisor retries.
        log.warning("job %s: database error; leaving the job to a retry", sys.argv[1], exc_info=True)
        code = EXIT_TRANSIENT
    sys.exit(code)


if __name__ == "__main__":
    main()
