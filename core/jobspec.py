"""What a fine-tuning job asks for: the method and its hyperparameters, validated the same way by api and worker."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import InvalidInput
from core.settings import Settings

TargetModules = Literal["all-linear", "attention"] | list[str]
# The q/k/v/o projections of Qwen2/Llama-style attention (the lecture's W_q, W_k, W_v, W_o).
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: float | None = Field(None, gt=0, le=100, description="Passes over the train split (default 3)")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides n_epochs")
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    batch_size: int = Field(8, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: TargetModules = "all-linear"
    max_seq_length: int = Field(512, ge=8)
    seed: int = Field(42, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    completion_only_loss: bool = Field(True, description="Loss on the assistant tokens only")

    @model_validator(mode="after")
    def _default_epochs(self) -> "Hyperparameters":
        if self.max_steps is None and self.n_epochs is None:
            self.n_epochs = 3
        return self

    def resolved_target_modules(self) -> list[str] | str:
        if self.target_modules == "attention":
            return ATTENTION_MODULES
        return self.target_modules

    def check_limits(self, settings: Settings) -> None:
        """Refuse what the deployment cannot train or serve, naming the parameter."""
        if self.lora_r not in settings.allowed_lora_ranks:
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
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise InvalidInput("target_modules must not be empty", param="hyperparameters.target_modules")


Method = Literal["lora"]


class JobSpec(BaseModel):
    """The body of POST /jobs."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(min_length=1, max_length=40)
    base_model: str | None = Field(None, max_length=512, description="Default: the deployment's base model")
    method: Method = "lora"
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str | None = Field(None, min_length=1, max_length=40, pattern=r"^[a-zA-Z0-9_-]+$")
