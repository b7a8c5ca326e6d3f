"""What serving must answer: greedy references from transformers + PEFT, random adapters registered like
trained ones, and the API's /generate as the tests call it."""

from __future__ import annotations

import copy
import json
import secrets
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.chat import prompt_text
from core.db import session_scope
from core.models import DEFAULT_TENANT_ID, Adapter, AdapterStatus
from core.repository import adapters as adapters_repo
from core.storage import Store, hash_dir
from tests.support.http import Response
from tests.support.stack import Stack

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_NEW = 6
PROMPTS: list[dict[str, Any]] = [
    {"prompt": "the cat sat on the"},
    {"messages": [{"role": "user", "content": "is this review good or bad: great fun"}]},
    {"messages": [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "name a colour"}]},
]


class Reference:
    """Greedy generations with transformers (+ PEFT), tokenized exactly as serving does."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self._cache: dict[tuple[str | None, str], list[int]] = {}
        self._models: dict[Path, Any] = {}

    def prompt_ids(self, request: dict[str, Any]) -> list[int]:
        if "messages" in request:
            text = prompt_text(self.tokenizer, request["messages"])
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(request["prompt"])["input_ids"])

    def _peft(self, adapter_dir: Path) -> Any:
        if adapter_dir not in self._models:
            self._models[adapter_dir] = PeftModel.from_pretrained(copy.deepcopy(self.base), str(adapter_dir)).eval()
        return self._models[adapter_dir]

    def greedy(self, adapter_dir: Path | None, request: dict[str, Any], max_new: int = MAX_NEW) -> list[int]:
        key = (str(adapter_dir) if adapter_dir else None, json.dumps(request, sort_keys=True))
        if key not in self._cache:
            model = self.base if adapter_dir is None else self._peft(adapter_dir)
            ids = torch.tensor([self.prompt_ids(request)])
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False
                )
            self._cache[key] = out[0, ids.shape[1] :].tolist()
        return self._cache[key]

    def logprobs(self, adapter_dir: Path | None, request: dict[str, Any], completion: list[int]) -> torch.Tensor:
        """log-softmax over the vocabulary at each completion position (rows: positions, in float32)."""
        model = self.base if adapter_dir is None else self._peft(adapter_dir)
        prompt = self.prompt_ids(request)
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)].float(), dim=-1)


def make_adapter(stack: Stack, reference: Reference, name: str, *, seed: int, rank: int = 8, edit: Any = None) -> Path:
    """A random LoRA, registered exactly like a trained one, in well under a second.

    PEFT's `init_lora_weights=False` draws both A and B at random (normally B starts at zero), so the
    adapter changes the output at once with no training. It is saved as safetensors into the store
    (`Store.adapter_dir`), and registered through `core.repository.adapters.add_adapter` with the sha256
    of every file, the same row a training job writes. `edit(directory)` may break the files before
    they are hashed (a bad config, wrong shapes): serving must then refuse the adapter on its merits.
    """
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(reference.base), config)
    store = Store(stack.settings)
    relative = store.adapter_dir(name)
    directory = store.resolve(relative)
    model.save_pretrained(str(directory))
    for extra in directory.iterdir():  # only what serving needs; README.md is PEFT's model card
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink()
    if edit is not None:
        edit(directory)
    files, size = hash_dir(directory)
    with session_scope(stack.settings.database_url) as session:
        adapters_repo.add_adapter(
            session,
            Adapter(
                name=name,
                tenant_id=DEFAULT_TENANT_ID,
                base_model=stack.settings.served_model_name,
                method="lora",
                rank=rank,
                alpha=2.0 * rank,
                target_modules=TARGETS,
                path=relative,
                files=files,
                size_bytes=size,
                status=AdapterStatus.ready,
                servable=True,
            ),
        )
    return directory


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def generate(stack: Stack, request: dict[str, Any], adapter: str | None = None, **kw: Any) -> Response:
    params = {"adapter": adapter} if adapter else {}
    body = {"temperature": 0, "max_tokens": MAX_NEW, **request, **kw}
    return stack.client.post("/generate", params=params, json=body)
