"""What a fine-tuning job asks for: the method and its hyperparameters, validated the same way by api and worker."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.bounds import MAX_INT32
from core.errors import InvalidInput
from core.evaluation.spec import JobEvaluation
from core.settings import Settings

TargetModules = Literal["all-linear", "attention"] | list[str]
# The q/k/v/o projections of Qwen2/Llama-style attention (the lecture's W_q, W_k, W_v, W_o).
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


Method = Literal["lora", "qlora", "dora", "prompt_tuning", "p_tuning", "prefix_tuning", "full"]
# Methods that add virtual tokens instead of changing weights (the lecture's prompt / P- / prefix tuning).
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
LORA_METHODS = ("lora", "qlora", "dora")

# What a job optimises, orthogonal to the method (the parameterisation): supervised fine-tuning, or a preference /
# reward objective trained with TRL's trainers.
Objective = Literal["sft", "dpo", "kto", "orpo", "grpo"]
PREFERENCE_OBJECTIVES = ("dpo", "kto", "orpo", "grpo")
DpoLoss = Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm"]
KtoLoss = Literal["kto", "apo_zero_unpaired"]
# Each objective's own knobs, and where they apply; a knob set for an objective it does not apply to is a 422.
OBJECTIVE_KNOBS: dict[str, tuple[str, ...]] = {
    "beta": ("dpo", "kto", "orpo", "grpo"),
    "loss_type": ("dpo", "kto"),
    "label_smoothing": ("dpo",),
    "reference_model": ("dpo", "kto"),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "num_generations": ("grpo",),
    "max_completion_length": ("grpo",),
    "temperature": ("grpo",),
    # Supervised-only knobs: the preference trainers build their own batches and labels.
    "packing": ("sft",),
    "completion_only_loss": ("sft",),
}
# TRL's defaults, where a knob is left out (GRPO's beta 0: no reference model, as TRL and DeepSeek-R1 do).
KNOB_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpo": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0},
    "kto": {"beta": 0.1, "loss_type": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "orpo": {"beta": 0.1},
    "grpo": {"beta": 0.0, "num_generations": 4, "max_completion_length": 16, "temperature": 1.0},
}


class Distributed(BaseModel):
    """Multi-process training: DDP through torchrun, or FSDP / DeepSpeed ZeRO through accelerate."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    num_processes: int = Field(2, ge=1, le=64)
    zero_stage: Literal[1, 2, 3] = 2
    offload: Literal["none", "cpu"] = "none"


class Hyperparameters(BaseModel):
    # allow_inf_nan=False: "inf" / "NaN" as strings pass pydantic's lax float parsing, and the job row's JSON column
    # cannot hold them (Postgres refuses Infinity). Every number is bounded by what its column or trainer can take.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_epochs: float | None = Field(None, gt=0, le=100, description="Passes over the train split (default 3)")
    max_steps: int | None = Field(None, gt=0, le=MAX_INT32, description="Optimizer steps; overrides n_epochs")
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    batch_size: int = Field(8, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    lora_r: int = Field(8, ge=1, le=4096)
    lora_alpha: float = Field(16.0, gt=0, le=1e6)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    use_rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r (rsLoRA)")
    target_modules: TargetModules = "all-linear"
    num_virtual_tokens: int = Field(16, ge=1, le=512, description="prompt_tuning, p_tuning, prefix_tuning")
    encoder_hidden_size: int = Field(128, ge=8, le=8192, description="p_tuning's prompt encoder width")
    max_seq_length: int = Field(512, ge=8, le=MAX_INT32)
    seed: int = Field(42, ge=0, le=MAX_INT32)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1e3)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    optimizer: Literal["adamw_torch", "adafactor", "sgd", "adamw_8bit", "paged_adamw_8bit"] = "adamw_torch"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    packing: bool = Field(False, description="Padding-free batches: examples concatenated, attention kept apart")
    completion_only_loss: bool = Field(True, description="Loss on the assistant tokens only")
    qlora_compute_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="qlora only")
    checkpoint_every_steps: int = Field(
        100, ge=1, le=MAX_INT32, description="Save a resumable checkpoint every N steps"
    )
    keep_checkpoints: int = Field(
        2, ge=2, le=100, description="Keep the last K checkpoints (at least 2, so a crash mid-save leaves a whole one)"
    )
    checkpoint_adapters: int = Field(
        0, ge=0, le=100, description="Publish the last N checkpoints as servable adapters when the job succeeds"
    )
    distributed: Distributed | None = None
    # Preference and reward objectives (OBJECTIVE_KNOBS says which applies where; None: the objective's default).
    beta: float | None = Field(None, gt=0, le=100, description="dpo/kto/orpo: strength of the preference; grpo: KL")
    loss_type: str | None = Field(
        None,
        max_length=32,
        description="dpo: sigmoid | ipo | hinge | robust | sigmoid_norm; kto: kto | apo_zero_unpaired",
    )
    label_smoothing: float | None = Field(None, ge=0, lt=0.5, description="dpo (sigmoid, robust): noisy labels")
    reference_model: Literal["base", "init_adapter"] | None = Field(
        None, description="dpo/kto: the frozen reference; default the init_adapter when there is one, else the base"
    )
    desirable_weight: float | None = Field(None, gt=0, le=1e3, description="kto")
    undesirable_weight: float | None = Field(None, gt=0, le=1e3, description="kto")
    num_generations: int | None = Field(None, ge=2, le=64, description="grpo: completions per prompt")
    max_completion_length: int | None = Field(None, ge=1, le=4096, description="grpo: tokens per completion")
    temperature: float | None = Field(None, gt=0, le=10, description="grpo: sampling temperature")
    time_limit_seconds: int | None = Field(
        None,
        ge=1,
        le=MAX_INT32,
        description="Wall-clock limit of one attempt; over it the job fails (time_limit). At most, and by default, "
        "the deployment's TUNESERVE_MAX_RUNTIME_SECONDS",
    )

    @model_validator(mode="after")
    def _default_epochs(self) -> Hyperparameters:
        if self.max_steps is None and self.n_epochs is None:
            self.n_epochs = 3
        return self

    def knob(self, objective: str, name: str) -> Any:
        """A preference knob's value for the objective: as set, else the objective's default."""
        value = getattr(self, name)
        return KNOB_DEFAULTS.get(objective, {}).get(name) if value is None else value

    def check_objective(self, objective: str, *, method: str, init_adapter: str | None) -> None:
        """Refuse knobs that do not apply to the objective, and combinations its trainer cannot run, naming them."""
        for name, objectives in OBJECTIVE_KNOBS.items():
            if name in self.model_fields_set and getattr(self, name) is not None and objective not in objectives:
                raise InvalidInput(
                    f"{name} does not apply to objective {objective}; it applies to {', '.join(objectives)}",
                    param=f"hyperparameters.{name}",
                )
        if objective == "sft":
            return
        if method not in LORA_METHODS:
            raise InvalidInput(
                f"objective {objective} trains LoRA adapters (lora, qlora, dora, rsLoRA); method {method} is not "
                "supported with it yet",
                param="method",
            )
        if self.distributed is not None:
            raise InvalidInput(
                f"objective {objective} trains in one process; distributed is not supported with it yet",
                param="hyperparameters.distributed",
            )
        allowed: tuple[str, ...] = {"dpo": get_args(DpoLoss), "kto": get_args(KtoLoss)}.get(objective, ())
        if self.loss_type is not None and allowed and self.loss_type not in allowed:
            raise InvalidInput(
                f"loss_type for {objective} must be one of {', '.join(allowed)}; got {self.loss_type!r}",
                param="hyperparameters.loss_type",
            )
        if objective == "dpo" and self.label_smoothing and self.knob("dpo", "loss_type") not in ("sigmoid", "robust"):
            raise InvalidInput(
                "label_smoothing applies to loss_type sigmoid or robust", param="hyperparameters.label_smoothing"
            )
        if self.reference_model == "init_adapter" and init_adapter is None:
            raise InvalidInput(
                "reference_model init_adapter needs an init_adapter", param="hyperparameters.reference_model"
            )
        if objective == "grpo":
            generations = self.knob("grpo", "num_generations")
            if (self.batch_size * self.gradient_accumulation_steps) % generations:
                # TRL samples whole groups of completions per prompt into each generation batch.
                raise InvalidInput(
                    f"batch_size x gradient_accumulation_steps ({self.batch_size * self.gradient_accumulation_steps}) "
                    f"must be a multiple of num_generations ({generations})",
                    param="hyperparameters.num_generations",
                )

    def resolved_target_modules(self) -> list[str] | str:
        if self.target_modules == "attention":
            return ATTENTION_MODULES
        return self.target_modules

    def steps_upper_bound(self, train_rows: int) -> int:
        """The most optimizer steps n_epochs can take over train_rows rows (max_steps when set).

        n_epochs x ceil(rows / (batch_size x gradient_accumulation_steps)), rounded up: more processes
        (each takes batch_size rows a step) and packing (several rows a sequence) only take fewer.
        """
        if self.max_steps is not None:
            return self.max_steps
        per_epoch = max(1, math.ceil(train_rows / (self.batch_size * self.gradient_accumulation_steps)))
        return math.ceil((self.n_epochs or 1) * per_epoch)

    def check_steps(self, settings: Settings, train_rows: int) -> None:
        """Refuse n_epochs that would take more than the deployment's max_steps over this many rows."""
        steps = self.steps_upper_bound(train_rows)
        if self.max_steps is None and steps > settings.max_steps:
            raise InvalidInput(
                f"n_epochs {self.n_epochs:g} over {train_rows} rows at {self.batch_size} x "
                f"{self.gradient_accumulation_steps} rows a step is up to {steps} steps; the limit is "
                f"{settings.max_steps} (TUNESERVE_MAX_STEPS): lower n_epochs or set max_steps",
                param="hyperparameters.n_epochs",
            )

    def check_limits(self, settings: Settings, method: str = "lora") -> None:
        """Refuse what the deployment cannot train or serve, naming the parameter."""
        if method in LORA_METHODS and self.lora_r not in settings.allowed_lora_ranks:
            raise InvalidInput(
                f"lora_r must be one that vLLM can serve: one of {list(settings.allowed_lora_ranks)}; got {self.lora_r}",
                param="hyperparameters.lora_r",
            )
        if self.max_seq_length > settings.max_seq_length:
            raise InvalidInput(
                f"max_seq_length must be at most {settings.max_seq_length}; got {self.max_seq_length}",
                param="hyperparameters.max_seq_length",
            )
        if self.max_steps is not None and self.max_steps > settings.max_steps:
            raise InvalidInput(
                f"max_steps must be at most {settings.max_steps}; got {self.max_steps}",
                param="hyperparameters.max_steps",
            )
        if self.time_limit_seconds is not None and self.time_limit_seconds > settings.max_runtime_seconds:
            raise InvalidInput(
                f"time_limit_seconds must be at most {settings.max_runtime_seconds} (TUNESERVE_MAX_RUNTIME_SECONDS); "
                f"got {self.time_limit_seconds}",
                param="hyperparameters.time_limit_seconds",
            )
        if self.keep_checkpoints > settings.max_keep_checkpoints:
            raise InvalidInput(
                f"keep_checkpoints must be at most {settings.max_keep_checkpoints} "
                f"(TUNESERVE_MAX_KEEP_CHECKPOINTS); got {self.keep_checkpoints}",
                param="hyperparameters.keep_checkpoints",
            )
        if self.checkpoint_adapters > self.keep_checkpoints:
            raise InvalidInput(
                f"checkpoint_adapters ({self.checkpoint_adapters}) must be at most keep_checkpoints "
                f"({self.keep_checkpoints}): only kept checkpoints can be published",
                param="hyperparameters.checkpoint_adapters",
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise InvalidInput("target_modules must not be empty", param="hyperparameters.target_modules")
        on_cpu = settings.training_device == "cpu"
        if on_cpu and self.precision == "fp16":
            raise InvalidInput(
                "precision fp16 needs a CUDA worker (this deployment trains on CPU); use bf16 or fp32",
                param="hyperparameters.precision",
            )
        if on_cpu and self.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            raise InvalidInput(
                f"optimizer {self.optimizer} needs a CUDA worker (this deployment trains on CPU); use adamw_torch or adafactor",
                param="hyperparameters.optimizer",
            )
        if method in VIRTUAL_TOKEN_METHODS and self.packing:
            raise InvalidInput(
                f"packing cannot be combined with {method}: virtual tokens need one sequence per row",
                param="hyperparameters.packing",
            )
        if method == "qlora" and self.qlora_compute_dtype == "float16" and on_cpu:
            raise InvalidInput(
                "qlora_compute_dtype float16 needs a CUDA worker", param="hyperparameters.qlora_compute_dtype"
            )
        if self.distributed is not None:
            d = self.distributed
            if d.strategy in ("fsdp", "deepspeed") and on_cpu:
                raise InvalidInput(
                    f"distributed.strategy {d.strategy} needs CUDA workers (this deployment trains on CPU); use ddp",
                    param="hyperparameters.distributed.strategy",
                )
            if d.num_processes > settings.max_training_processes:
                raise InvalidInput(
                    f"distributed.num_processes must be at most {settings.max_training_processes}",
                    param="hyperparameters.distributed.num_processes",
                )
            if method == "qlora" and d.strategy != "ddp":
                raise InvalidInput("qlora trains with ddp only", param="hyperparameters.distributed.strategy")


class JobSpec(BaseModel):
    """The body of POST /jobs."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(min_length=1, max_length=40)
    base_model: str | None = Field(None, max_length=512, description="Default: the deployment's base model")
    method: Method = "lora"
    objective: Objective = Field("sft", description="sft (default) | dpo | kto | orpo | grpo")
    init_adapter: str | None = Field(
        None, min_length=1, max_length=128, description="Start from this adapter (same tenant and base model)"
    )
    grader: dict[str, Any] | None = Field(None, description="grpo: the declarative grader that rewards completions")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    validation_dataset_id: str | None = Field(
        None, min_length=1, max_length=40, description="sft: held-out rows (their train split) whose loss is logged"
    )
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="Up to 16 of the client's own key-value labels, stored and returned"
    )
    evaluation: JobEvaluation = Field(
        default_factory=JobEvaluation, description="Base vs adapter on the test split after training"
    )
