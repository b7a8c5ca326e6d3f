"""A synthetic sentiment task that a random tiny model fails and a small LoRA learns."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SYSTEM_PROMPT = "Answer positive or negative."
USER_PREFIX = "Classify the sentiment:"
POSITIVE_WORDS = [
    "good",
    "great",
    "happy",
    "love",
    "excellent",
    "wonderful",
    "nice",
    "best",
    "amazing",
    "glad",
    "perfect",
    "fun",
]
NEGATIVE_WORDS = [
    "bad",
    "awful",
    "sad",
    "hate",
    "terrible",
    "horrible",
    "poor",
    "worst",
    "ugly",
    "angry",
    "boring",
    "broken",
]
FILLER_WORDS = [
    "the",
    "a",
    "table",
    "window",
    "river",
    "blue",
    "chair",
    "car",
    "street",
    "book",
    "tree",
    "house",
    "door",
    "paper",
    "green",
    "city",
    "train",
    "water",
    "stone",
    "road",
    "lamp",
    "cup",
    "phone",
    "box",
    "wall",
    "cloud",
    "shoe",
    "desk",
    "bird",
    "garden",
    "yellow",
    "morning",
    "bread",
    "bottle",
    "clock",
    "hill",
    "bridge",
    "letter",
    "music",
    "shop",
]
# Kept short so a prompt stays well under 40 tokens and training is fast.
MIN_FILLER, MAX_FILLER = 3, 6
DEMO_VOCABULARY: list[str] = sorted(
    set(
        POSITIVE_WORDS
        + NEGATIVE_WORDS
        + FILLER_WORDS
        + ["positive", "negative", "Classify", "sentiment", "Answer", "or"]
    )
)
# Test rows come from their own stream so a small train set cannot exhaust them.
_TEST_SEED_OFFSET = 1_000_003


def _row(prompt: str, label: str) -> dict[str, Any]:
    """Build one chat-format row."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": label},
        ]
    }


def _prompts(rng: random.Random) -> Iterator[tuple[str, str]]:
    """Yield endless (prompt, label) pairs: filler words with one sentiment word inside."""
    while True:
        label = "positive" if rng.random() < 0.5 else "negative"
        sentiment = rng.choice(POSITIVE_WORDS if label == "positive" else NEGATIVE_WORDS)
        words = [rng.choice(FILLER_WORDS) for _ in range(rng.randint(MIN_FILLER, MAX_FILLER))]
        words.insert(rng.randint(0, len(words)), sentiment)
        yield f"{USER_PREFIX} {' '.join(words)}", label


def _unique_rows(rng: random.Random, n: int, exclude: set[str]) -> list[dict[str, Any]]:
    """Take n rows whose prompts are distinct and not in exclude."""
    seen = set(exclude)
    rows: list[dict[str, Any]] = []
    for prompt, label in _prompts(rng):
        if len(rows) == n:
            break
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append(_row(prompt, label))
    return rows


def demo_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Return n deterministic rows with distinct user prompts in OpenAI chat format."""
    return _unique_rows(random.Random(seed), n, set())


def user_prompt(row: dict[str, Any]) -> str:
    """Return the user message of a row."""
    return str(next(m["content"] for m in row["messages"] if m["role"] == "user"))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows one JSON object per line."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_demo_dataset(out_dir: Path, n_train: int = 512, n_test: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and test.jsonl, with no test prompt also in train."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = demo_rows(n_train, seed)
    train_prompts = {user_prompt(r) for r in train}
    test = _unique_rows(random.Random(seed + _TEST_SEED_OFFSET), n_test, train_prompts)
    assert not train_prompts & {user_prompt(r) for r in test}, "test prompts leaked into train"
    train_path, test_path = out_dir / "train.jsonl", out_dir / "test.jsonl"
    _write_jsonl(train_path, train)
    _write_jsonl(test_path, test)
    return train_path, test_path


def preference_row(row: dict[str, Any]) -> dict[str, Any]:
    """A demo row as a preference pair: chosen the right label, rejected the wrong one (prompt/chosen/rejected)."""
    *prompt, answer = row["messages"]
    label = answer["content"]
    return {"prompt": prompt, "chosen": label, "rejected": "negative" if label == "positive" else "positive"}


def write_demo_preference_dataset(
    out_dir: Path, n_train: int = 512, n_test: int = 64, seed: int = 0
) -> tuple[Path, Path]:
    """The demo task's train/test split as preference pairs (the same prompts as write_demo_dataset's)."""
    out_dir = Path(out_dir)
    sft_dir = out_dir / "sft"
    train, test = write_demo_dataset(sft_dir, n_train, n_test, seed)
    paths = []
    for source in (train, test):
        rows = [preference_row(json.loads(line)) for line in source.read_text(encoding="utf-8").splitlines()]
        target = out_dir / f"preference-{source.name}"
        _write_jsonl(target, rows)
        paths.append(target)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> None:
    """CLI: write the demo train/test split."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preference", action="store_true", help="Preference pairs (chosen right, rejected wrong)")
    args = parser.parse_args(argv)
    write = write_demo_preference_dataset if args.preference else write_demo_dataset
    train_path, test_path = write(args.out, args.n_train, args.n_test, args.seed)
    print(train_path)  # noqa: T201 - a command: the paths it wrote, one a line
    print(test_path)  # noqa: T201


if __name__ == "__main__":
    main()
