"""Resumable training checkpoints of a job, kept in the store under jobs/<id>/checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from core.settings import Settings
from core.storage import Store

# Written by the training child after the Trainer finished writing a checkpoint; a checkpoint without
# it may be half-written (the child was killed mid-save) and is never resumed from.
COMPLETE_MARKER = "TUNESERVE_COMPLETE"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    complete: bool
    created_at: datetime
    size_bytes: int
    path: Path

    def to_public(self) -> dict[str, object]:
        """What users see: no server paths."""
        return {
            "object": "fine_tuning.job.checkpoint",
            "step": self.step,
            "complete": self.complete,
            "created_at": int(self.created_at.timestamp()),
            "size_bytes": self.size_bytes,
        }


def checkpoints_dir(settings: Settings, job_id: str) -> Path:
    return Store(settings).job_dir(job_id) / "checkpoints"


def list_checkpoints(settings: Settings, job_id: str) -> list[Checkpoint]:
    root = checkpoints_dir(settings, job_id)
    found = []
    for path in root.glob("checkpoint-*") if root.is_dir() else []:
        suffix = path.name.rsplit("-", 1)[-1]
        if not suffix.isdigit():
            continue
        files = [p for p in path.rglob("*") if p.is_file()]
        found.append(
            Checkpoint(
                step=int(suffix),
                complete=(path / COMPLETE_MARKER).exists(),
                created_at=datetime.fromtimestamp(path.stat().st_mtime, UTC),
                size_bytes=sum(p.stat().st_size for p in files),
                path=path,
            )
        )
    return sorted(found, key=lambda c: c.step)


def latest_complete(settings: Settings, job_id: str) -> Checkpoint | None:
    complete = [c for c in list_checkpoints(settings, job_id) if c.complete]
    return complete[-1] if complete else None


def mark_complete(checkpoint_dir: Path, step: int) -> None:
    (checkpoint_dir / COMPLETE_MARKER).write_text(json.dumps({"step": step}))


# A checkpoint published as an adapter when its job succeeds (hyperparameters.checkpoint_adapters): `ft-...-step-N`.
CHECKPOINT_ADAPTER_MARK = "-step-"


def checkpoint_adapter_name(adapter_name: str, step: int) -> str:
    return f"{adapter_name}{CHECKPOINT_ADAPTER_MARK}{step}"


def checkpoint_adapter_step(adapter_name: str, name: str) -> int | None:
    """The step of `name` when it is one of `adapter_name`'s published checkpoints, else None."""
    prefix = adapter_name + CHECKPOINT_ADAPTER_MARK
    digits = name.removeprefix(prefix) if name.startswith(prefix) else ""
    return int(digits) if digits.isdigit() else None
