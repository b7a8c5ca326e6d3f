"""Batch builders for training: right padding, or padding-free packing of short examples."""

from __future__ import annotations

from typing import Any

from core.chat import IGNORE_INDEX


class PaddingCollator:
    """Right padding for training; labels padded with IGNORE_INDEX so padding never counts in the loss."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id
        self.real_tokens = 0  # tokens that are not padding, for tokens/s
        self.batch_tokens = 0  # tokens the model computed on, padding included

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        self.real_tokens += sum(len(f["input_ids"]) for f in features)
        self.batch_tokens += width * len(features)
        ids, labels, mask = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(f["input_ids"] + [self.pad_token_id] * pad)
            labels.append(f["labels"] + [IGNORE_INDEX] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


class PackingCollator:
    """Padding-free batches: the examples concatenated into one row, position ids restarting per example.

    With no attention mask, transformers derives a block-diagonal causal mask from the position ids
    (masking_utils.find_packed_sequence_indices), so no example attends to another and no compute goes
    to padding. The first label of every example is ignored so no token is predicted across a boundary.
    """

    def __init__(self) -> None:
        self.real_tokens = 0
        self.batch_tokens = 0

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for f in features:
            ids.extend(f["input_ids"])
            labels.extend([IGNORE_INDEX] + f["labels"][1:])
            positions.extend(range(len(f["input_ids"])))
        self.real_tokens += len(ids)
        self.batch_tokens += len(ids)
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
            # transformers builds the per-example mask only when no KV cache is passed; a model whose
            # config says use_cache=True would otherwise get one and let examples attend to each other.
            "use_cache": False,
        }
