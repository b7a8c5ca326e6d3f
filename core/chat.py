"""One chat template for training, evaluation and serving (docs/architecture.md, invariant 8): how rows become tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
Message = dict[str, str]


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def _template_ids(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_for_training(
    tokenizer: Any, messages: list[Message], *, max_length: int, completion_only: bool = True
) -> EncodedExample:
    """Token ids of the whole conversation; labels keep only assistant turns when completion_only."""
    input_ids = _template_ids(tokenizer, messages, add_generation_prompt=False)
    if completion_only:
        labels = [IGNORE_INDEX] * len(input_ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            # The template is prefix-stable (ChatML), so a turn's tokens are the span between the
            # prompt that precedes it and the conversation up to it.
            start = len(_template_ids(tokenizer, messages[:i], add_generation_prompt=True))
            end = len(_template_ids(tokenizer, messages[: i + 1], add_generation_prompt=False))
            labels[start:end] = input_ids[start:end]
    else:
        labels = list(input_ids)
    truncated = len(input_ids) > max_length
    return EncodedExample(input_ids[:max_length], labels[:max_length], truncated)


def split_prompt_reference(messages: list[Message]) -> tuple[list[Message], str]:
    """The conversation before its last assistant turn, and that turn's text (the evaluation reference)."""
    assert messages and messages[-1]["role"] == "assistant", "a row ends with an assistant message"
    return messages[:-1], messages[-1]["content"]


def prompt_text(tokenizer: Any, messages: list[Message]) -> str:
    """The text a model continues to answer `messages`, as training saw it."""
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
