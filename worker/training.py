"""The training child process: one attempt of one job, with transformers + peft.

Run as `python -m worker.training JOB_ID OWNER`. It writes progress and events to SQL, stops at the
cancel flag, saves the adapter atomically into the store and registers it in the same transaction
that marks the job succeeded (only while it still holds the lease). Exit codes: 0 when the job
reached a terminal state, EXIT_TRANSIENT when another attempt may succeed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from core.chat import IGNORE_INDEX, encode_for_training
from core.db import session_scope
from core.errors import TrainingError
from core.jobspec import Hyperparameters
from core.models import Adapter, AdapterStatus, Job, JobEvent, JobStatus
from core.repository import adapters as adapters_repo
from core.repository import jobs as jobs_repo
from core.settings import Settings, get_settings
from core.storage import Store, hash_dir

EXIT_TRANSIENT = 75  # EX_TEMPFAIL
log = logging.getLogger("tuneserve.training")


def adapter_name_for(job: Job) -> str:
    return f"ft-{job.suffix or job.method}-{job.id.split('-', 1)[1]}"


def load_rows(store: Store, dataset_path: str, split: str) -> list[list[dict[str, str]]]:
    path = store.resolve(dataset_path) / f"{split}.jsonl"
    if not path.exists():
        raise TrainingError("dataset_missing", f"the dataset's {split} split is missing from the store", param="dataset_id")
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line]


class Attempt:
    """Everything one attempt needs to talk to SQL."""

    def __init__(self, settings: Settings, job_id: str, owner: str, attempt: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.owner = owner
        self.attempt = attempt

    def event(self, message: str, *, kind: str = "message", level: str = "info", **metrics: Any) -> None:
        with session_scope(self.settings.database_url) as s:
            jobs_repo.add_event(
                s, JobEvent(job_id=self.job_id, kind=kind, level=level, attempt=self.attempt, message=message, **metrics)
            )

    def progress(self, step: int, total: int | None, loss: float | None) -> bool:
        with session_scope(self.settings.database_url) as s:
            return jobs_repo.record_progress(s, self.job_id, owner=self.owner, step=step, total_steps=total, loss=loss)

    def cancel_requested(self) -> bool:
        with session_scope(self.settings.database_url) as s:
            return jobs_repo.is_cancel_requested(s, self.job_id)

    def finish(self, status: JobStatus, *, error: TrainingError | None = None) -> None:
        with session_scope(self.settings.database_url) as s:
            jobs_repo.finish_job(
                s,
                self.job_id,
                owner=self.owner,
                status=status,
                error=(error.code, error.message, error.param) if error else None,
            )
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


def _make_callback(attempt: Attempt):  # type: ignore[no-untyped-def]
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):  # type: ignore[misc]
        """Loss events every few steps, the cancel flag every step, the lease as a guard."""

        cancelled = False
        lease_lost = False

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            attempt.progress(state.global_step, state.max_steps, None)

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if attempt.cancel_requested():
                self.cancelled = True
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            logs = logs or {}
            loss = logs.get("loss")
            if loss is None:
                return
            if not attempt.progress(state.global_step, state.max_steps, float(loss)):
                self.lease_lost = True
                control.should_training_stop = True
                return
            attempt.event(
                f"step {state.global_step}/{state.max_steps}: loss {loss:.4f}",
                kind="metrics",
                step=state.global_step,
                epoch=float(logs.get("epoch", state.epoch or 0.0)),
                loss=float(loss),
                learning_rate=float(logs.get("learning_rate", 0.0)),
            )

    return ProgressCallback()


class PaddingCollator:
    """Right padding for training; labels padded with IGNORE_INDEX so padding never counts in the loss."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids, labels, mask = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(f["input_ids"] + [self.pad_token_id] * pad)
            labels.append(f["labels"] + [IGNORE_INDEX] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def train(attempt: Attempt, job: Job, dataset_path: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    settings = attempt.settings
    store = Store(settings)
    hp = Hyperparameters.model_validate(job.hyperparameters)
    rows = load_rows(store, dataset_path, "train")

    tokenizer = AutoTokenizer.from_pretrained(settings.base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = [
        encode_for_training(tokenizer, m, max_length=hp.max_seq_length, completion_only=hp.completion_only_loss)
        for m in rows
    ]
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded if any(l != IGNORE_INDEX for l in e.labels)]
    truncated = sum(e.truncated for e in encoded)
    if not examples:
        raise TrainingError(
            "no_trainable_tokens",
            "after truncation to max_seq_length no example has assistant tokens left; raise max_seq_length",
            param="hyperparameters.max_seq_length",
        )
    train_tokens = sum(len(e["input_ids"]) for e in examples)
    attempt.event(
        f"{len(examples)} training examples, {train_tokens} tokens, {truncated} truncated to {hp.max_seq_length} tokens"
    )

    torch.manual_seed(hp.seed)
    model = AutoModelForCausalLM.from_pretrained(settings.base_model, dtype=torch.float32)
    lora = LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=hp.resolved_target_modules(),
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise TrainingError("invalid_target_modules", str(e), param="hyperparameters.target_modules") from None

    workdir = store.job_dir(job.id)
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.n_epochs or 1,
        max_steps=hp.max_steps or -1,
        lr_scheduler_type=hp.lr_scheduler_type,
        warmup_steps=hp.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=hp.weight_decay,
        logging_steps=settings.event_every_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to=[],
        seed=hp.seed,
        data_seed=hp.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    callback = _make_callback(attempt)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples,  # type: ignore[arg-type]
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        callbacks=[callback],
    )
    started = time.monotonic()
    trainer.train()
    if callback.lease_lost:
        log.warning("job %s: lease lost, leaving the job to its new owner", job.id)
        return
    if callback.cancelled:
        attempt.finish(JobStatus.cancelled)
        return
    elapsed = time.monotonic() - started
    steps = trainer.state.global_step
    attempt.progress(steps, steps, None)
    attempt.event(f"trained {steps} steps in {elapsed:.1f}s ({train_tokens * (hp.n_epochs or 1) / max(elapsed, 1e-9):.0f} tokens/s)")
    publish_adapter(attempt, job, model, hp, train_tokens)


def publish_adapter(attempt: Attempt, job: Job, model: Any, hp: Hyperparameters, train_tokens: int) -> None:
    """Write the adapter to a staging dir, move it into place, then register it with the job's success."""
    settings = attempt.settings
    store = Store(settings)
    name = adapter_name_for(job)
    relative = store.adapter_dir(name)
    with store.staging_dir() as staged:
        model.save_pretrained(str(staged), safe_serialization=True)
        files, size = hash_dir(staged)
        store.publish(staged, relative)
    # PEFT expands "all-linear" to full module paths; record the layer names users know (q_proj, ...).
    target_modules = sorted({m.rsplit(".", 1)[-1] for m in model.peft_config["default"].target_modules})
    with session_scope(settings.database_url) as s:
        if not jobs_repo.finish_job(
            s, job.id, owner=attempt.owner, status=JobStatus.succeeded, adapter_name=name, train_tokens=train_tokens
        ):
            raise TrainingError("lease_lost", "another attempt owns this job now", transient=True)
        adapters_repo.add_adapter(
            s,
            Adapter(
                name=name,
                job_id=job.id,
                base_model=job.base_model,
                method=job.method,
                rank=hp.lora_r,
                alpha=hp.lora_alpha,
                target_modules=target_modules,
                path=relative,
                files=files,
                size_bytes=size,
                status=AdapterStatus.ready,
                servable=True,
            ),
        )
        jobs_repo.add_event(
            s, JobEvent(job_id=job.id, kind="status", attempt=attempt.attempt, message=f"job succeeded: adapter {name}")
        )


def run(job_id: str, owner: str) -> int:
    settings = get_settings()
    with session_scope(settings.database_url) as s:
        job = jobs_repo.get_job(s, job_id)
        if job is None or job.lease_owner != owner or job.status != JobStatus.running:
            return 0
        from core.repository.datasets import get_dataset

        dataset = get_dataset(s, job.dataset_id)
        dataset_path = dataset.path if dataset else ""
        attempt = Attempt(settings, job_id, owner, job.attempt_count)
    try:
        train(attempt, job, dataset_path)
        return 0
    except TrainingError as e:
        if e.transient:
            attempt.event(e.message, level="warning")
            return EXIT_TRANSIENT
        attempt.finish(JobStatus.failed, error=e)
        return 0
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
            attempt.event(f"out of memory: {e}", level="warning")
            return EXIT_TRANSIENT
        log.exception("training failed")
        attempt.finish(JobStatus.failed, error=TrainingError("training_error", f"{type(e).__name__}: {e}"))
        return 0
    except Exception as e:  # noqa: BLE001 - the user gets the reason instead of a silent crash
        log.exception("training failed")
        attempt.finish(JobStatus.failed, error=TrainingError("training_error", f"{type(e).__name__}: {e}"))
        return 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(run(sys.argv[1], sys.argv[2]))


if __name__ == "__main__":
    main()
