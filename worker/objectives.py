"""Preference and reward objectives (DPO, KTO, ORPO, GRPO) as TRL trainers over our PEFT model.

The losses are TRL's; this module only turns stored rows into the datasets each trainer reads, picks the reference
model, and passes our knobs through. Rows are conversational (prompt messages, assistant answers), so TRL applies the
tokenizer's chat template: the one template training, evaluation and serving share (invariant 8).
"""

from __future__ import annotations

import json
from typing import Any

from core.dataset_formats import Row
from core.errors import TrainingError
from core.graders import grader_name, parse_grader, score
from core.jobspec import Hyperparameters


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def trl_rows(objective: str, records: list[Row]) -> list[dict[str, Any]]:
    """The stored rows as the objective's TRL dataset (the API already checked that the dataset feeds it)."""
    out: list[dict[str, Any]] = []
    for r in records:
        if objective in ("dpo", "orpo"):
            out.append(
                {"prompt": r["prompt"], "chosen": _assistant(r["chosen"]), "rejected": _assistant(r["rejected"])}
            )
        elif objective == "kto":
            if "chosen" in r:  # a pair, unpaired: the chosen answer desirable, the rejected one not
                out.append({"prompt": r["prompt"], "completion": _assistant(r["chosen"]), "label": True})
                out.append({"prompt": r["prompt"], "completion": _assistant(r["rejected"]), "label": False})
            else:
                out.append({"prompt": r["prompt"], "completion": _assistant(r["completion"]), "label": r["label"]})
        elif objective == "grpo":
            if isinstance(r, list):  # a supervised row: its last assistant turn is the reference
                out.append({"prompt": r[:-1], "reference": r[-1]["content"]})
            elif "item" in r:  # a reinforcement row: its fields, as JSON (one column whatever keys each row has)
                item = {"messages": r["prompt"], **r["item"]}
                out.append({"prompt": r["prompt"], "reference": "", "item": json.dumps(item)})
            else:
                out.append({"prompt": r["prompt"], "reference": r["chosen"]})
        else:  # pragma: no cover - JobSpec's Literal refuses anything else
            raise TrainingError("invalid_objective", f"unknown objective {objective}", param="objective")
    if not out:
        raise TrainingError("no_rows", "the dataset's train split has no rows for this objective", param="dataset_id")
    return out


def reward_function(grader_json: dict[str, Any]) -> Any:
    """GRPO's reward: the job's declarative grader on each completion against its row's reference column."""
    grader = parse_grader(grader_json)

    def reward(completions: list[Any], reference: list[str], item: list[str] | None = None, **_: Any) -> list[float]:
        # TRL passes prompts, completions and every dataset column by keyword; the grader reads the reference column,
        # and an OpenAI grader's {{item.<field>}} the row's fields.
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        items = [json.loads(i) for i in item] if item is not None else [None] * len(texts)
        return [score(grader, t, ref, it) for t, ref, it in zip(texts, reference, items, strict=True)]

    # TRL logs each reward function's mean under rewards/<name>/mean.
    reward.__name__ = grader_name(grader)
    return reward


def _reference(trainer: Any, reference: str) -> Any:
    """Make the trainer's reference pass the one asked for.

    Given a PeftModel, TRL adds a frozen copy of its adapter named "ref" and computes reference log-probs through it:
    the init_adapter when continuing one. Against the base model, the copy is dropped and TRL computes them with the
    adapters disabled (what it does for its own peft_config): the same log-probs as a fresh (B = 0) copy, without the
    copy's memory and compute, and without loading a second base model when continuing an adapter.
    """
    model = trainer.model
    if reference == "base" and "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")  # the one being trained stays active and trainable
    return trainer


def build_objective_trainer(
    *,
    objective: str,
    model: Any,
    reference: str,
    tokenizer: Any,
    hp: Hyperparameters,
    rows: list[dict[str, Any]],
    arguments: dict[str, Any],
    grader: dict[str, Any] | None,
    callbacks: list[Any],
) -> Any:
    """TRL's trainer for the objective, over `model` (already a PeftModel) with our arguments and knobs.

    reference (DPO, KTO): "base" or "init_adapter", the frozen model the policy is compared with.
    """
    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    knob = hp.knob
    common = {"model": model, "train_dataset": dataset, "processing_class": tokenizer, "callbacks": callbacks}
    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        dpo_args = DPOConfig(
            **arguments,
            beta=knob("dpo", "beta"),
            loss_type=[knob("dpo", "loss_type")],
            label_smoothing=knob("dpo", "label_smoothing"),
            max_length=hp.max_seq_length,
        )
        return _reference(DPOTrainer(args=dpo_args, **common), reference)
    if objective == "kto":
        from trl import KTOConfig, KTOTrainer

        kto_args = KTOConfig(
            **arguments,
            beta=knob("kto", "beta"),
            loss_type=knob("kto", "loss_type"),
            desirable_weight=knob("kto", "desirable_weight"),
            undesirable_weight=knob("kto", "undesirable_weight"),
            max_length=hp.max_seq_length,
        )
        return _reference(KTOTrainer(args=kto_args, **common), reference)
    if objective == "orpo":
        # ORPO lives in trl.experimental in TRL 1.16; it needs no reference model (the odds ratio is the policy's own).
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        orpo_args = ORPOConfig(**arguments, beta=knob("orpo", "beta"), max_length=hp.max_seq_length)
        return ORPOTrainer(args=orpo_args, **common)
    if objective == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        assert grader is not None, "the API refuses a grpo job without a grader"
        grpo_args = GRPOConfig(
            **arguments,
            beta=knob("grpo", "beta"),
            num_generations=knob("grpo", "num_generations"),
            max_completion_length=knob("grpo", "max_completion_length"),
            temperature=knob("grpo", "temperature"),
        )
        return GRPOTrainer(args=grpo_args, reward_funcs=[reward_function(grader)], **common)
    raise TrainingError("invalid_objective", f"unknown objective {objective}", param="objective")
