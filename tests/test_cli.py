"""The `tuneserve` CLI driving a real job to the end, against a real API served by uvicorn, on both stacks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner, Result

from cli.main import app
from tests.support.paths import API_SCRIPT, ROOT
from tests.support.processes import die_with_parent, free_port, stop_process_group
from tests.support.stack import Stack

FAST = {"max_steps": 12, "learning_rate": 3e-3, "batch_size": 8, "lora_r": 8, "lora_alpha": 16, "seed": 1}
# A small before/after evaluation, so `eval report` and the plot's test-loss points have data.
FAST_EVALUATION = {"max_examples": 4, "max_new_tokens": 4, "batch_size": 4, "metrics": ["exact_match", "loss"]}


def console_script_argv(name: str) -> list[str]:
    """Run a [project.scripts] entry point with this interpreter (no reinstall needed after editing pyproject)."""
    module, func = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][name].split(":")
    return [sys.executable, "-c", f"from {module} import {func}; {func}()"]


@pytest.fixture(scope="module")
def api_url(stack: Stack) -> Iterator[str]:
    """`tuneserve-api` (uvicorn) on a loopback port with the stack's settings; serving points at a closed port."""
    port = free_port()
    env = dict(
        stack.env,
        TUNESERVE_API_HOST="127.0.0.1",
        TUNESERVE_API_PORT=str(port),
        TUNESERVE_RECONCILE_INTERVAL_SECONDS="0",  # the stack's in-process API already reconciles
        TUNESERVE_SERVING_URL=f"http://127.0.0.1:{free_port()}",
    )
    log_path = stack.settings.data_dir / "cli-api.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            console_script_argv(API_SCRIPT),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the api exited with {process.returncode}; log: {log_path}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the api was not ready in 120 s; log: {log_path}")
            time.sleep(0.3)
        yield url
    finally:
        stop_process_group(process)


@pytest.fixture
def tuneserve(api_url: str, stack: Stack) -> Any:
    runner = CliRunner()

    def run(*args: str | Path) -> Result:
        # Wide enough that rich never folds an id inside a table cell; the key comes from the environment.
        env = {"COLUMNS": "220", "TUNESERVE_API_KEY": stack.api_key}
        return runner.invoke(app, ["--api", api_url, *map(str, args)], env=env)

    return run


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def test_a_job_from_upload_to_plot(stack: Stack, tuneserve: Any, demo_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = demo_files
    dataset = json.loads(ok(tuneserve("--json", "datasets", "upload", train, "--test-file", test)).stdout)
    assert dataset["splits"] == {"train": 256, "test": 32}
    assert dataset["id"] in ok(tuneserve("datasets", "list")).stdout

    sets = [f"{k}={json.dumps(v)}" for k, v in FAST.items()]
    sets += [f"evaluation.{k}={json.dumps(v)}" for k, v in FAST_EVALUATION.items()]
    created = ok(
        tuneserve(
            "--json",
            "jobs",
            "create",
            "--dataset",
            dataset["id"],
            "--suffix",
            "cli",
            *[arg for s in sets for arg in ("--set", s)],
        )
    )
    job = json.loads(created.stdout)
    assert job["status"] == "queued" and job["hyperparameters"]["max_steps"] == 12
    assert job["hyperparameters"]["learning_rate"] == 3e-3 and job["hyperparameters"]["lora_r"] == 8

    watched = ok(tuneserve("jobs", "watch", job["id"], "--interval", "0.5"))
    assert "succeeded" in watched.stdout
    assert "12/12" in watched.stderr, "the progress bar ends at step 12 of 12"
    job = stack.client.get(f"/jobs/{job['id']}").json()
    adapter = job["fine_tuned_model"]
    assert job["status"] == "succeeded" and adapter and adapter in watched.stdout

    shown = ok(tuneserve("jobs", "show", job["id"])).stdout
    assert "succeeded" in shown and adapter in shown and "12/12 (100.0%)" in shown
    assert job["id"] in ok(tuneserve("jobs", "list", "--status", "succeeded")).stdout

    listed = ok(tuneserve("adapters", "list")).stdout
    assert adapter in listed
    details = json.loads(ok(tuneserve("--json", "adapters", "show", adapter)).stdout)
    assert details["job_id"] == job["id"] and details["rank"] == 8
    assert details["files"]["adapter_model.safetensors"] in ok(tuneserve("adapters", "show", adapter)).stdout

    # The before/after evaluation the job queued runs on the same worker.
    deadline = time.monotonic() + 300
    while (evaluation := stack.client.get(f"/jobs/{job['id']}").json()["evaluation"])["status"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline, f"evaluation did not finish: {evaluation}"
        time.sleep(1)
    assert evaluation["status"] == "succeeded", evaluation
    report = ok(tuneserve("eval", "report", job["id"])).stdout
    assert "exact_match" in report and "loss (lower is better)" in report
    assert f"{evaluation['adapter']['loss']:.4g}" in report

    image = tmp_path / "plots" / "loss.png"
    plotted = ok(tuneserve("jobs", "plot", job["id"], "-o", image))
    assert "test loss" in plotted.stdout
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 10_000
    with Image.open(image) as png:
        assert png.size == (800, 450)
        assert len(png.getcolors(maxcolors=1_000_000) or []) > 50, "a plot, not a blank image"


def test_errors_print_the_apis_message_and_param(
    stack: Stack, tuneserve: Any, demo_dataset: dict, tmp_path: Path
) -> None:
    def expect_api_error(result: Result, error: dict[str, Any]) -> None:
        assert result.exit_code == 1, result.output
        assert error["message"] in result.stderr and f"(param: {error['param']})" in result.stderr, result.stderr

    # A hyperparameter vLLM could not serve: the same 4xx body the API gives to any client.
    body = {"dataset_id": demo_dataset["id"], "hyperparameters": {"lora_r": 7}}
    error = stack.client.post("/jobs", json=body).json()["error"]
    assert error["param"] == "hyperparameters.lora_r"
    expect_api_error(tuneserve("jobs", "create", "-d", demo_dataset["id"], "--set", "lora_r=7"), error)

    error = stack.client.post("/jobs", json={"dataset_id": "ds-missing"}).json()["error"]
    expect_api_error(tuneserve("jobs", "create", "--dataset", "ds-missing"), error)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    result = tuneserve("datasets", "upload", bad)
    assert result.exit_code == 1 and "line 2" in result.stderr and "(param: file:2" in result.stderr, result.stderr

    result = tuneserve("jobs", "show", "ftjob-missing")
    assert result.exit_code == 1 and "HTTP 404" in result.stderr

    # Serving is down (nothing listens where the API looks for it): a 503, said plainly.
    result = tuneserve("generate", "hello", "--max-tokens", "4")
    assert result.exit_code == 1 and "serving is not available" in result.stderr, result.stderr

    # Caught by the CLI before any request.
    result = tuneserve("datasets", "upload", bad, "--test-file", bad, "--test-fraction", "0.1")
    assert result.exit_code == 2 and "not both" in result.output
    result = tuneserve("jobs", "create", "-d", demo_dataset["id"], "--set", "no-equals-sign")
    assert result.exit_code == 2 and "key=value" in result.output

    assert not [
        j
        for j in stack.client.get("/jobs", params={"limit": 100}).json()["data"]
        if j["hyperparameters"].get("lora_r") == 7
    ], "a rejected job must change nothing"
