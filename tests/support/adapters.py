"""PEFT adapters and archives of them, made on the spot for the import tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

TARGETS = ["q_proj", "v_proj"]


def peft_adapter(base_model: str, directory: Path, *, trained: bool, rank: int = 4) -> Path:
    """A PEFT LoRA adapter for the base model, saved as PEFT saves it: random A and B when `trained`, else
    PEFT's own initialisation (B = 0: the adapter changes nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=not trained)
    model = get_peft_model(base, config)
    if trained:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.5)  # large enough that greedy answers change
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def tar_gz(members: dict[str, bytes], *, links: dict[str, tuple[bytes, bytes]] | None = None) -> bytes:
    """A .tar.gz of name -> bytes, plus link members name -> (kind SYMTYPE/LNKTYPE, target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target.decode()
            archive.addfile(info)
    return buffer.getvalue()


def files_of(directory: Path, prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{p.name}": p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
