"""tuneserve's own serving metrics, where vLLM has none: adapter resolutions by outcome and refusals by reason.

They live on prometheus_client's default registry, the one vLLM's `GET /metrics` serves (requests, tokens,
latencies, KV cache, and per-LoRA running/waiting requests in `vllm:lora_requests_info`), so one scrape of a
replica returns both. Serving's guard asks for the serving token there too (header or `Authorization: Bearer`).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ADAPTER_RESOLUTIONS = Counter(
    "tuneserve_serving_adapter_resolutions",
    "Adapter names the registry resolver was asked for, by outcome (verified, not_found, refused)",
    ["outcome"],
)
ADAPTER_LOAD_FAILURES = Counter(
    "tuneserve_serving_adapter_load_failures",
    "Adapters refused before vLLM loads them, by reason (sha256, missing_file, extra_file, config, shapes, "
    "not_ready, base_model)",
    ["reason"],
)
SHA256_REFUSALS = Counter(
    "tuneserve_serving_sha256_refusals", "Adapters refused because a file does not match its recorded sha256"
)
RESOLVE_SECONDS = Histogram(
    "tuneserve_serving_adapter_resolve_seconds",
    "Time to look an adapter up in SQL and verify its files (before vLLM loads it)",
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def record_refusal(reason: str) -> None:
    """An adapter refused; `reason` is a short fixed word (see ADAPTER_LOAD_FAILURES)."""
    ADAPTER_RESOLUTIONS.labels("refused").inc()
    ADAPTER_LOAD_FAILURES.labels(reason).inc()
    if reason == "sha256":
        SHA256_REFUSALS.inc()
