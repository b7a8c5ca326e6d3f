"""What the API and serving agree on over HTTP (serving is vLLM's own OpenAI server plus tuneserve's guard).

Neither side imports the other: the API forwards OpenAI bodies to these paths, serving checks the token header.
"""

from __future__ import annotations

TOKEN_HEADER = "X-Tuneserve-Serving-Token"

COMPLETIONS_PATH = "/v1/completions"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
# vLLM's runtime adapter endpoints (on with VLLM_ALLOW_RUNTIME_LORA_UPDATING, which the resolver needs). Loading by
# path is not in SERVING_PATHS (adapters come only from the registry, verified); unloading is, for the API's
# DELETE /adapters/{name}, behind the token like every serving path.
LOAD_LORA_PATH = "/v1/load_lora_adapter"
UNLOAD_LORA_PATH = "/v1/unload_lora_adapter"

# Everything serving answers; vLLM's server has more (load adapters by path, SageMaker's /adapters and
# /invocations, the Responses API's stored responses, elastic scaling), and serving's guard answers 404 to all of
# it, token or not: this list is what the API needs and what operators scrape.
SERVING_PATHS = frozenset(
    {HEALTH_PATH, METRICS_PATH, MODELS_PATH, COMPLETIONS_PATH, CHAT_COMPLETIONS_PATH, UNLOAD_LORA_PATH, "/version"}
)

# The resolver refuses an adapter that is registered but cannot be served with vLLM's 422 naming `model` and a
# message that starts with this; the API turns it into its own `adapter_not_servable`.
NOT_SERVABLE_PREFIX = "adapter_not_servable: "
