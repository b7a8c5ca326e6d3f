"""What an evaluation asks for (POST /evaluations, and a job's before/after option), validated the same way everywhere."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.adapter_ops import MAX_SCALE, MIN_SCALE
from core.bounds import MAX_INT32
from core.errors import InvalidInput
from core.evaluation.metrics import ALL_METRICS

if TYPE_CHECKING:
    from core.settings import Settings

# Spelled out for the schema; tests/test_metrics.py checks it against ALL_METRICS.
MetricName = Literal[
    "exact_match",
    "contains",
    "rouge1",
    "rouge2",
    "rougeL",
    "token_f1",
    "loss",
    "perplexity",
    "preference_accuracy",
    "mean_margin",
    "grader",
]
DEFAULT_METRICS: list[MetricName] = list(ALL_METRICS)  # type: ignore[arg-type]
Scale = Annotated[float, Field(ge=MIN_SCALE, le=MAX_SCALE, allow_inf_nan=False)]
MAX_EVAL_BATCH = 128
MAX_SCALES = 16


class EvaluationOptions(BaseModel):
    """How predictions are made and scored."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[MetricName] = Field(default_factory=lambda: list(DEFAULT_METRICS), min_length=1, max_length=32)
    batch_size: int = Field(16, ge=1, le=MAX_EVAL_BATCH, description="Prompts per left-padded generation batch")
    max_new_tokens: int = Field(32, ge=1, le=1024)
    max_examples: int | None = Field(
        None,
        ge=1,
        le=MAX_INT32,
        description="Evaluate only the split's first N examples (at most TUNESERVE_MAX_EVALUATION_EXAMPLES)",
    )

    def check_max_examples(self, settings: Settings, *, param: str) -> None:
        """The deployment's cap on what one evaluation scores (and stores as samples): 422 naming `param`."""
        cap = settings.max_evaluation_examples
        if self.max_examples is not None and self.max_examples > cap:
            raise InvalidInput(
                f"{param} must be at most {cap} (TUNESERVE_MAX_EVALUATION_EXAMPLES); got {self.max_examples}",
                param=param,
            )


class EvaluationSpec(EvaluationOptions):
    """The body of POST /evaluations."""

    dataset_id: str = Field(min_length=1, max_length=40)
    split: Literal["train", "test"] = "test"
    adapter: str | None = Field(None, max_length=128, description="Adapter name; null evaluates the base model")
    scales: list[Scale] | None = Field(
        None, min_length=1, max_length=MAX_SCALES, description="Adapter scales s (delta times s); default [1]"
    )


class JobEvaluation(EvaluationOptions):
    """A job's before/after evaluation on its dataset's test split (skipped when the dataset has none)."""

    enabled: bool = True
    scales: list[Scale] = Field(default_factory=lambda: [1.0], min_length=1, max_length=MAX_SCALES)
