"""Batched greedy generation with LEFT padding, and teacher-forced loss on the references (torch; worker side only).

Left padding keeps every prompt's last token at the end of the row, so the first generated token of
every row comes from its own prompt; the attention mask hides the pads and generate() derives the
position ids from it, so a row's tokens match what the same prompt gives alone (docs/architecture.md, invariant 9).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.chat import IGNORE_INDEX, Message, encode_for_training, prompt_text


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding and a pad token, as batched generation needs (the pad id never reaches the model: masked)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _length_order(lengths: Sequence[int]) -> list[int]:
    # Batching prompts of similar length wastes less compute on padding; results go back in input order.
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    on_batch: Callable[[int], None] | None = None,
    max_prompt_tokens: int | None = None,
) -> list[list[int]]:
    """Greedy new token ids for each prompt (text already in the chat template), batch_size prompts at a time.

    max_prompt_tokens: a longer prompt keeps only its last tokens (the question and the assistant header),
    so prompt plus answer fit the model (see prompt_token_budget).
    """
    import torch

    prepare_tokenizer(tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if max_prompt_tokens is not None:
        encoded = [e[-max_prompt_tokens:] if len(e) > max_prompt_tokens else e for e in encoded]
    order = _length_order([len(e) for e in encoded])
    eos = tokenizer.eos_token_id
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, padding=True, return_tensors="pt")
        width = batch["input_ids"].shape[1]
        with torch.inference_mode():
            generated = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
        for row, i in enumerate(chunk):
            tokens = generated[row, width:].tolist()
            # A row that finished early is filled with pad ids after its eos; cut at the eos.
            if eos is not None and eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            out[i] = tokens
        if on_batch is not None:
            on_batch(min(start + batch_size, len(order)))
    return out


# Tokenizers that know no limit report a huge model_max_length (1e30); below this it is a real one.
_REAL_LENGTH_LIMIT = 1_000_000


def model_length(model: Any, tokenizer: Any, max_model_len: int) -> int:
    """Tokens a sequence may have: the least of the model's positions, the tokenizer's limit and max_model_len
    (the deployment's serving_max_model_len, so evaluation sees what serving would)."""
    limits = [max_model_len]
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < _REAL_LENGTH_LIMIT:
        limits.append(tokenizer_limit)
    return min(limits)


def prompt_token_budget(model: Any, tokenizer: Any, *, max_model_len: int, max_new_tokens: int) -> int:
    """The most prompt tokens that leave room for max_new_tokens (at least one token of prompt)."""
    return max(1, model_length(model, tokenizer, max_model_len) - max_new_tokens)


def decode_prediction(tokenizer: Any, tokens: list[int]) -> str:
    return str(tokenizer.decode(tokens, skip_special_tokens=True)).strip()


@dataclass(frozen=True)
class ReferenceLoss:
    """Summed negative log-likelihood of an example's assistant tokens, and how many there were."""

    nll: float
    tokens: int

    @property
    def mean(self) -> float | None:
        return self.nll / self.tokens if self.tokens else None


def reference_losses(
    model: Any, tokenizer: Any, conversations: Sequence[list[Message]], *, batch_size: int, max_length: int
) -> list[ReferenceLoss]:
    """Teacher-forced NLL of each conversation's assistant tokens (the labels training uses)."""
    import torch

    encoded = [encode_for_training(tokenizer, m, max_length=max_length) for m in conversations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = _length_order([len(e.input_ids) for e in encoded])
    results: list[ReferenceLoss] = [ReferenceLoss(0.0, 0)] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i].input_ids) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(encoded[i].input_ids)
            ids[row, :n] = torch.tensor(encoded[i].input_ids)
            labels[row, :n] = torch.tensor(encoded[i].labels)
            mask[row, :n] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        # Token t is predicted from the logits at t-1.
        shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shifted_logits.reshape(-1, shifted_logits.shape[-1]),
            shifted_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(shifted_labels.shape)
        counted = shifted_labels != IGNORE_INDEX
        for row, i in enumerate(chunk):
            results[i] = ReferenceLoss(float(nll[row][counted[row]].sum()), int(counted[row].sum()))
    return results


def corpus_loss(losses: Sequence[ReferenceLoss]) -> tuple[float | None, float | None]:
    """Token-weighted mean loss over all references, and its perplexity."""
    tokens = sum(r.tokens for r in losses)
    if not tokens:
        return None, None
    loss = sum(r.nll for r in losses) / tokens
    return loss, math.exp(min(loss, 700.0))


def chat_prompts(tokenizer: Any, conversations: Sequence[list[Message]]) -> list[str]:
    """The generation prompt of each conversation (everything before its last assistant turn)."""
    from core.chat import split_prompt_reference

    return [prompt_text(tokenizer, split_prompt_reference(m)[0]) for m in conversations]
