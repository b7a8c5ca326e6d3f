"""All of tuneserve's settings, read once from the environment (prefix TUNESERVE_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# vLLM can only serve these LoRA ranks (vllm.config.lora.LoRAConfig.max_lora_rank choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNESERVE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Root for the embedded database, broker and store")
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite file in data_dir")
    broker_url: str = Field("", description="Celery broker URL; default: Celery over SQLite in data_dir")
    store_root: Path | None = Field(None, description="Datasets and adapters live here; default data_dir/store")
    base_model: str = Field("", description="Local model dir or hub name; default data_dir/models/tiny")
    served_model_name: str = Field("", description="Name of the base model in the API; default: base_model's last part")
    queue_name: str = Field("tuneserve", description="Celery queue for training tasks")

    max_upload_bytes: int = Field(50 * 1024 * 1024, gt=0)
    max_dataset_rows: int = Field(200_000, gt=0)
    max_line_bytes: int = Field(1024 * 1024, gt=0)
    max_lora_rank: int = Field(64, description="Highest LoRA rank a job may ask for (and serving loads)")
    max_seq_length: int = Field(4096, gt=0)
    max_steps: int = Field(100_000, gt=0)

    lease_seconds: int = Field(60, gt=0, description="A claimed job's lease; the heartbeat renews it")
    heartbeat_seconds: float = Field(5.0, gt=0)
    cancel_grace_seconds: float = Field(10.0, gt=0, description="Wait after a cancel before killing the child")
    reconcile_interval_seconds: float = Field(15.0, ge=0, description="0 turns the API's reconciler off")
    requeue_after_seconds: int = Field(120, gt=0, description="Re-send a queued job nobody claimed after this long")
    max_attempts: int = Field(3, ge=1)
    event_every_steps: int = Field(5, ge=1, description="Write a loss event every N optimizer steps")

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> "Settings":
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'tuneserve.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        self.store_root = (self.store_root or self.data_dir / "store").expanduser().resolve()
        if not self.base_model:
            self.base_model = str(self.data_dir / "models" / "tiny")
        if not self.served_model_name:
            self.served_model_name = Path(self.base_model).name or self.base_model
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}")
        return self

    @property
    def allowed_lora_ranks(self) -> tuple[int, ...]:
        return tuple(r for r in VLLM_LORA_RANKS if r <= self.max_lora_rank)

    @property
    def store(self) -> Path:
        assert self.store_root is not None
        return self.store_root

    def ensure_dirs(self) -> None:
        """Create the directories the embedded defaults point at."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.store / "datasets").mkdir(parents=True, exist_ok=True)
        (self.store / "adapters").mkdir(parents=True, exist_ok=True)
        (self.store / "tmp").mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
