"""`python -m serving` (vLLM's OpenAI server with tuneserve's resolver) as the tests run it: one engine per session, small enough for 2 CPU cores."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.paths import ROOT
from tests.support.processes import serving_command, start_in_own_group, stop_process_group


@dataclass
class ServingProcess:
    """`python -m serving` started on a stack's settings: the one vLLM engine of a test session."""

    url: str
    token: str
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> None:
        """Spawn serving (its own process group) and return once /health answers: the port opens after the engine."""
        import httpx

        self.process = start_in_own_group(serving_command(), env=self.env, log=self.log, cwd=ROOT)
        headers, deadline = {"X-Tuneserve-Serving-Token": self.token}, time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"serving exited with {self.process.returncode}; log: {self.log}")
            try:
                if httpx.get(f"{self.url}/health", headers=headers).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serving not ready in 300 s; log: {self.log}")
            time.sleep(0.5)

    def loaded_adapters(self) -> list[str]:
        """The adapters vLLM has resolved and holds now (its /v1/models lists them after the base model)."""
        import httpx

        models = httpx.get(f"{self.url}/v1/models", headers={"X-Tuneserve-Serving-Token": self.token}).json()
        return [m["id"] for m in models["data"] if m.get("parent")]

    def metric(self, prefix: str, label: str = "") -> float:
        """The sum of this replica's Prometheus samples whose line starts with `prefix` (and holds `label`)."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", headers={"X-Tuneserve-Serving-Token": self.token}).text
        lines = [line for line in text.splitlines() if line.startswith(prefix) and label in line]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    def restart(self) -> None:
        """Stop serving (SIGTERM, as a deploy does) and start a fresh engine on the same port and settings."""
        stop_process_group(self.process)
        self.start()


SERVING_TEST_SETTINGS: dict[str, Any] = {
    "max_lora_rank": 8,
    "serving_max_loras": 2,
    "serving_max_cpu_loras": 4,
    "serving_max_model_len": 512,
    "serving_max_tokens": 256,
    "serving_max_num_seqs": 32,
    "serving_kv_cache_gib": 1,
    "serving_dtype": "float32",
}
