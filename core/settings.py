"""All of tuneserve's settings, read once from the environment (prefix TUNESERVE_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# vLLM can only serve these LoRA ranks (vllm.config.lora.LoRAConfig.max_lora_rank choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Every secret in .env.example starts with this; a setting that still holds it is refused at startup.
PLACEHOLDER_SECRET = "change-me"


class Settings(BaseSettings):
    # env_ignore_empty: a variable set but empty means the default (docker-compose.yml passes `${VAR:-}`).
    model_config = SettingsConfigDict(env_prefix="TUNESERVE_", env_file=".env", extra="ignore", env_ignore_empty=True)

    data_dir: Path = Field(Path("var"), description="Root for the embedded database, broker and store")
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite file in data_dir")
    broker_url: str = Field("", description="Celery broker URL; default: Celery over SQLite in data_dir")
    store_root: Path | None = Field(None, description="Datasets and adapters live here; default data_dir/store")
    base_model: str = Field("", description="Local model dir or hub name; default data_dir/models/tiny")
    served_model_name: str = Field("", description="Name of the base model in the API; default: base_model's last part")
    queue_name: str = Field("tuneserve", description="Celery queue for training tasks")
    model_aliases: str = Field(
        "",
        description="Other names of the base model, `name=base` pairs separated by commas (e.g. "
        "`gpt-4o-mini-2024-07-18=tiny`), so an OpenAI script's model name means the local base",
    )

    auth_enabled: bool = Field(
        True, description="Require a tenant's bearer API key; false only for a single-user embedded demo (one tenant)"
    )
    max_upload_bytes: int = Field(
        50 * 1024 * 1024, gt=0, description="Largest dataset upload, file and test_file together (413 past it)"
    )
    max_adapter_upload_bytes: int = Field(
        1024 * 1024 * 1024, gt=0, description="Largest adapter archive POST /adapters takes (and its unpacked files)"
    )
    max_dataset_rows: int = Field(200_000, gt=0, description="Rows in one dataset upload (422 past it)")
    max_line_bytes: int = Field(1024 * 1024, gt=0, description="One JSONL line of a dataset, in bytes (422 past it)")
    max_messages_per_row: int = Field(256, gt=0, description="Messages in one chat row of a dataset (422 past it)")
    max_chars_per_row: int = Field(
        200_000, gt=0, description="Characters of text (all messages together) in one dataset row (422 past it)"
    )

    # Limits on what any client may send (docs/api.md, "Limits"); each is refused in the one error shape.
    max_json_body_bytes: int = Field(
        4 * 1024 * 1024,
        gt=0,
        description=(
            "Largest request body of every route but the two uploads, refused with 413 before routing: a prompt of "
            "max_prompt_chars ASCII characters (1 MB) fits with room for JSON escapes and the other fields"
        ),
    )
    max_multipart_overhead_bytes: int = Field(
        64 * 1024, ge=0, description="Multipart framing allowed on top of an upload's limit (boundaries, part headers)"
    )
    max_prompt_chars: int = Field(
        1_000_000,
        gt=0,
        le=1_000_000,
        description="Characters of one prompt (or of all chat messages together), checked before tokenizing; "
        "at most 1 000 000 (serving's own bound)",
    )
    max_prompts_per_request: int = Field(
        16, gt=0, le=128, description="Prompts in one /v1/completions request (a list)"
    )
    max_messages_per_request: int = Field(
        1024, gt=0, le=4096, description="Chat messages in one /generate or /v1/chat/completions request"
    )
    auth_cache_seconds: float = Field(
        10.0, ge=0, description="How long a valid key is remembered by the pre-routing check (the route still checks)"
    )
    max_archive_members: int = Field(1000, gt=0, description="Members (files, folders) of an adapter archive")
    max_archive_header_bytes: int = Field(
        1024 * 1024, gt=0, description="Bytes of member headers (names, tar/pax/zip records) of an adapter archive"
    )
    max_adapter_config_bytes: int = Field(1024 * 1024, gt=0, description="Size of an imported adapter_config.json")
    max_safetensors_header_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="JSON header of a safetensors file, checked before it is parsed"
    )
    adapter_unpack_timeout_seconds: float = Field(
        60.0, gt=0, description="Wall and CPU time for unpacking one adapter archive (in a child process)"
    )
    adapter_unpack_memory_bytes: int = Field(
        1024 * 1024 * 1024, gt=0, description="Address space of the child process that unpacks an adapter archive"
    )
    metrics_cache_seconds: float = Field(
        5.0, ge=0, description="The SQL and broker parts of /metrics and /readyz are reused for this long"
    )
    metrics_token: str = Field("", description="When set, GET /metrics needs Authorization: Bearer <metrics_token>")
    max_lora_rank: int = Field(64, description="Highest LoRA rank a job may ask for (and serving loads)")
    max_seq_length: int = Field(4096, gt=0, description="Highest max_seq_length a job may ask for (422 above it)")
    max_steps: int = Field(
        100_000, gt=0, description="Most optimizer steps a job may ask for, as max_steps or n_epochs (422 above it)"
    )
    training_device: str = Field(
        "cpu", description="cpu | cuda: what the workers train on (checks precision, optimizers)"
    )
    max_training_processes: int = Field(2, ge=1, description="Highest distributed.num_processes a job may ask for")

    lease_seconds: int = Field(60, gt=0, description="A claimed job's lease; the heartbeat renews it")
    heartbeat_seconds: float = Field(5.0, gt=0, description="How often a worker renews the lease of the record it runs")
    warm_children: bool = Field(
        True,
        description="Fork job, evaluation and adapter-operation children from a per-worker process that has "
        "imported torch, transformers, peft and TRL already (starts in about a second instead of about ten); "
        "false starts each child with a fresh interpreter",
    )
    cancel_grace_seconds: float = Field(10.0, gt=0, description="Wait after a cancel before killing the child")
    reconcile_interval_seconds: float = Field(15.0, ge=0, description="0 turns the API's reconciler off")
    requeue_after_seconds: int = Field(120, gt=0, description="Re-send a queued job nobody claimed after this long")
    broker_visibility_timeout_seconds: int = Field(
        6 * 3600,
        gt=0,
        description=(
            "Redis broker only: a message taken by a worker comes back from Redis only after this long (acked late, "
            "so even while its job still trains); kept long on purpose, since the reconciler, not the broker, brings "
            "lost jobs back, and any earlier redelivery would only be turned away by the lease"
        ),
    )
    tenant_max_running_work: int = Field(
        0,
        ge=0,
        description="Records (jobs, evaluations, adapter operations) one tenant may have running at once across all "
        "workers; past it a worker takes another tenant's work or waits. 0: no cap (workers always take the fairly "
        "next record: the tenant with the least running, then the least recently served, goes first)",
    )
    max_attempts: int = Field(
        3, ge=1, description="Attempts of a record; past them a transient failure (child killed, worker lost) fails it"
    )
    max_runtime_seconds: int = Field(
        24 * 3600,
        gt=0,
        description="Wall-clock limit of one attempt of any worker child (training, evaluation, derive, merge, canary); "
        "a job's hyperparameters.time_limit_seconds may only lower it. Over it the record fails with time_limit",
    )
    sweep_interval_seconds: float = Field(
        300.0, gt=0, description="How often the reconciler runs its sweeper (leftover files, broker messages)"
    )
    sweep_min_age_seconds: int = Field(
        3600,
        gt=0,
        description="The reconciler's sweeper deletes staging leftovers and unregistered store directories this old",
    )
    idempotency_key_ttl_seconds: int = Field(
        86_400, gt=0, description="How long an Idempotency-Key is remembered; after that the key may be reused"
    )
    max_active_jobs: int = Field(
        100, ge=1, description="Queued plus running jobs per tenant; a POST /jobs over it gets 429"
    )
    active_jobs_retry_after_seconds: int = Field(
        30,
        ge=1,
        description="Retry-After sent with a 429 for any active-work limit (jobs, evaluations, adapter operations)",
    )
    max_active_evaluations: int = Field(
        50,
        ge=1,
        description="Queued plus running evaluations per tenant (a job's own count); a POST /evaluations over it gets 429",
    )
    max_active_adapter_operations: int = Field(
        50, ge=1, description="Queued plus running derives, merges and import canaries per tenant; over it: 429"
    )
    max_adapters_per_tenant: int = Field(
        1000,
        ge=1,
        description="Adapters and merged models a tenant keeps (not deleted), counting the queued or running work that "
        "will make one; a job, derive, merge or import past it gets 413",
    )
    max_storage_bytes_per_tenant: int = Field(
        100 * 1024**3,
        ge=1,
        description="Datasets + adapters + merged models + checkpoints of one tenant; an upload or import that would pass "
        "it, or a job / derive / merge submitted at or over it, gets 413",
    )
    max_keep_checkpoints: int = Field(3, ge=2, description="Highest keep_checkpoints a job may ask for (disk per job)")
    max_evaluation_examples: int = Field(
        10_000,
        ge=1,
        description="Most examples one evaluation scores (a job's before/after ones too): a larger max_examples is a "
        "422, and an evaluation without one scores the split's first this many",
    )
    max_concurrent_uploads_per_tenant: int = Field(
        4,
        ge=1,
        description="Dataset uploads (POST /datasets, /v1/files) and adapter imports (POST /adapters) one tenant may "
        "have in progress at once in one API process; past it a 429 before the body is read",
    )
    max_sample_chars: int = Field(
        4096,
        ge=64,
        description="An evaluation sample's prompt, reference or prediction is stored cut to this many characters",
    )
    event_every_steps: int = Field(5, ge=1, description="Write a loss event every N optimizer steps")

    # The API process (`tuneserve-api`).
    api_host: str = Field("127.0.0.1", description="tuneserve-api binds here (0.0.0.0 inside its container)")
    api_port: int = Field(8000, gt=0, lt=65536, description="tuneserve-api listens on this port")

    # The web console (/ui) and its live job stream (GET /jobs/{id}/events/stream).
    console_enabled: bool = Field(True, description="Serve the web console at /ui (static pages; data via the API)")
    event_stream_poll_seconds: float = Field(
        1.0, gt=0, le=60, description="How often a job's event stream reads SQL (a short session per read)"
    )
    event_stream_max_seconds: float = Field(
        600.0, gt=0, description="A job's event stream ends after this; the client reconnects with ?after="
    )

    # Serving: vLLM's OpenAI server (enable_lora, the registry resolver) in its own process per replica, reachable
    # only from the API.
    serving_host: str = Field("127.0.0.1", description="Serving binds here: loopback or an internal network only")
    serving_port: int = Field(8100, gt=0, lt=65536, description="Port python -m serving binds")
    serving_url: str = Field("", description="Where the API reaches serving; default http://serving_host:serving_port")
    serving_urls: str = Field(
        "",
        description="Serving replicas, comma-separated (each request goes to its adapter's replica: rendezvous "
        "hashing, failover to the next); empty: the one serving_url",
    )
    serving_token: str = Field("", description="Shared secret the API sends to serving; required off loopback")
    serving_max_loras: int = Field(4, ge=1, description="Distinct adapters batched together in one engine step")
    serving_max_cpu_loras: int = Field(8, ge=1, description="Adapters kept loaded (LRU cache); >= serving_max_loras")
    serving_max_model_len: int = Field(2048, gt=0, description="Prompt plus completion tokens per request")
    serving_max_num_seqs: int = Field(64, gt=0, description="Requests batched together in one engine step")
    serving_kv_cache_gib: int = Field(1, ge=1, description="CPU KV cache GiB (VLLM_CPU_KVCACHE_SPACE, whole GiB)")
    serving_gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU only")
    serving_dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16")
    serving_tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs each serving replica shards the base model over (vLLM tensor parallelism)"
    )
    serving_enforce_eager: bool = Field(True, description="No CUDA graphs / torch.compile (faster start)")
    serving_max_tokens: int = Field(1024, gt=0, description="Highest max_tokens a request may ask for")
    serving_tool_call_parser: str = Field(
        "",
        description="vLLM tool-call parser for the base model's chat template (e.g. hermes, llama3_json); "
        "empty: requests with tools are refused with vLLM's 400",
    )
    max_concurrent_generations_per_tenant: int = Field(
        32, ge=1, description="Generations one tenant may have running at once, per API process (429 beyond)"
    )
    max_choices_per_request: int = Field(8, ge=1, le=128, description="Highest `n` a generation request may ask for")
    serving_timeout_seconds: float = Field(600.0, gt=0, description="The API's read timeout on a serving call")
    serving_retry_after_seconds: int = Field(5, ge=1, description="Retry-After sent while serving is unreachable")

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
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
        for alias, target in self.model_alias_map.items():
            if target not in (self.base_model, self.served_model_name):
                raise ValueError(f"model_aliases: {alias}={target} must name the base model ({self.served_model_name})")
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}")
        if not self.serving_url:
            self.serving_url = f"http://{self.serving_host}:{self.serving_port}"
        if self.serving_max_cpu_loras < self.serving_max_loras:
            raise ValueError("serving_max_cpu_loras must be >= serving_max_loras")
        if self.serving_max_tokens >= self.serving_max_model_len:
            raise ValueError("serving_max_tokens must be < serving_max_model_len (a prompt needs room too)")
        # .env.example's placeholders are public: a deployment that kept one has no secret at all.
        for name in ("serving_token", "metrics_token", "database_url"):
            if PLACEHOLDER_SECRET in getattr(self, name):
                raise ValueError(
                    f"{name} still holds the .env.example placeholder ({PLACEHOLDER_SECRET}...): "
                    "set a real secret, e.g. `openssl rand -hex 32`"
                )
        return self

    @property
    def serving_url_list(self) -> list[str]:
        """The replicas the API sends generations to (at least one)."""
        urls = [u.strip().rstrip("/") for u in self.serving_urls.split(",") if u.strip()]
        return urls or [self.serving_url.rstrip("/")]

    @property
    def model_alias_map(self) -> dict[str, str]:
        """model_aliases as {alias: base}; a pair without `=` or with an empty side is an error at start."""
        pairs = {}
        for item in (p.strip() for p in self.model_aliases.split(",")):
            if not item:
                continue
            alias, sep, target = (x.strip() for x in item.partition("="))
            if not (sep and alias and target):
                raise ValueError(f"model_aliases: {item!r} is not name=base")
            pairs[alias] = target
        return pairs

    def names_base_model(self, name: str) -> bool:
        """Whether `name` is the base model: its path, its served name or one of model_aliases."""
        return name in (self.base_model, self.served_model_name) or name in self.model_alias_map

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
