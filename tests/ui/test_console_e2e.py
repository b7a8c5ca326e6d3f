"""The whole loop in a real Chromium, against the real stack (API under uvicorn, Celery worker, vLLM serving):
sign in, a bad file's line error, the demo dataset, a job whose loss chart grows while it trains, the before/after
report with the adapter ahead (and its scale sweep), base and adapter answering side by side in the playground,
and the adapters page: derive, delete, and an import whose canary says ready."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from core.demo_data import SYSTEM_PROMPT
from core.storage import Store
from tests.support.adapters import files_of, tar_gz
from tests.support.browser import api_server, recorded_page, sign_in
from tests.support.stack import Stack

pytestmark = [pytest.mark.browser, pytest.mark.training]

# The demo task's recipe (scripts/demo.py), fewer steps: the tiny model learns it in seconds.
STEPS = 150
BAD_FILE = b'{"prompt": "Classify the sentiment: a good day", "completion": "positive"}\n{"prompt": "no completion"}\n'


def wait_for(check: Any, *, timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


def test_fine_tune_compare_and_chat_in_the_browser(
    browser: Any, serving_stack: Stack, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    started = time.monotonic()
    serving_stack.start_worker()
    # The stack's in-process API already reconciles: this server (the one the browser talks to) does not.
    settings = serving_stack.settings.model_copy(update={"reconcile_interval_seconds": 0})
    train, test = demo_files
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(BAD_FILE)
    with api_server(settings) as url, recorded_page(browser, url) as r:
        page = r.page
        sign_in(r, serving_stack.api_key)

        # Datasets: a bad line is refused with its number and field; then the demo task, with its test file.
        r.goto("/ui/datasets")
        page.locator("#train-file").set_input_files(str(bad))
        page.get_by_role("button", name="Upload").click()
        error = page.get_by_test_id("upload-error")
        error.wait_for(state="visible")
        assert "line 2" in error.inner_text() and "completion" in error.inner_text(), error.inner_text()
        r.screenshot("datasets-line-error")
        page.locator("#train-file").set_input_files(str(train))
        page.get_by_label("a test file").check()
        page.locator("#test-file").set_input_files(str(test))
        page.get_by_role("button", name="Upload").click()
        page.get_by_test_id("upload-ok").wait_for(state="visible")
        assert "train 256" in page.get_by_test_id("upload-ok").inner_text()
        r.screenshot("datasets")

        # Jobs: train on it, with the demo's recipe typed into the form.
        page.get_by_test_id("upload-ok").get_by_role("link", name="Train on it").click()
        page.wait_for_url("**/ui/jobs?dataset=*")
        r.wait_ready()
        form = page.get_by_test_id("job-form")
        form.locator("#f-suffix").fill("ui")
        form.locator("#f-hyperparameters-max_steps").fill(str(STEPS))
        form.locator("#f-hyperparameters-learning_rate").fill("0.003")
        form.locator("#f-hyperparameters-batch_size").fill("16")
        # Folded away: the before/after evaluation sweeps the adapter's scale, with short answers (one label).
        page.locator("#advanced summary").click()
        form.locator("#f-evaluation-scales").fill("0, 0.5, 1")
        form.locator("#f-evaluation-max_new_tokens").fill("8")
        form.get_by_role("button", name="Start training").click()
        page.wait_for_url("**/ui/jobs/ftjob-*")
        r.wait_ready()

        # The loss chart gains points while the job runs (the live event stream, not a reload).
        chart = page.get_by_test_id("loss-chart")
        status = page.get_by_test_id("job-status")

        def points() -> int:
            return int(chart.get_attribute("data-points") or 0)

        first = wait_for(
            lambda: points() if points() > 0 and status.inner_text() == "running" else 0,
            timeout=240,
            what="a first loss point while running",
        )
        r.screenshot("job-training")
        wait_for(lambda: points() > first, timeout=120, what="more loss points")
        assert status.inner_text() in ("running", "succeeded")
        status.filter(has_text="succeeded").wait_for(timeout=300_000)
        adapter = page.get_by_test_id("job-adapter").inner_text()
        assert adapter.startswith("ft-ui-")

        # The before/after report: the adapter ahead of the base model on the held-out split.
        report = page.get_by_test_id("report")
        report.wait_for(state="visible", timeout=300_000)
        rows = page.get_by_test_id("metrics-table").locator("tbody tr")
        table = {
            row.locator("th").inner_text().split(" ")[0]: [float(c) for c in row.locator("td").all_inner_texts()[:2]]
            for row in rows.all()
        }
        base, tuned = table["exact_match"]
        assert tuned > base, table
        sweep = page.get_by_role("img", name="metrics at each adapter scale")
        assert sweep.locator("canvas").count() == 1 and sweep.is_visible()
        examples = page.get_by_test_id("examples-table").locator("tbody tr")
        assert examples.count() > 0
        page.get_by_label("only where the adapter changed the answer").check()
        assert 0 < examples.count() <= 10
        r.screenshot("job-report")

        # Playground: base and adapter side by side on a held-out question, streamed; they answer differently.
        page.get_by_role("link", name="try it in the playground").click()
        page.wait_for_url("**/ui/playground?adapter=*")
        r.wait_ready()
        assert page.get_by_role("checkbox", name=adapter).is_checked()
        row = json.loads(test.read_text().splitlines()[0])
        page.get_by_label("System message").fill(SYSTEM_PROMPT)
        page.get_by_label("Your message").fill(row["messages"][-2]["content"])
        page.get_by_label("max tokens").fill("8")
        page.get_by_label("temperature").fill("0")
        page.get_by_role("button", name="Send").click()
        answers = page.get_by_test_id("answer")
        answers.nth(1).get_by_test_id("answer-stats").wait_for(state="visible", timeout=120_000)
        answers.nth(0).get_by_test_id("answer-stats").wait_for(state="visible", timeout=120_000)
        texts = answers.get_by_test_id("answer-text").all_inner_texts()
        assert len(texts) == 2 and all(t.strip() for t in texts), texts
        assert texts[0] != texts[1], texts
        assert "tokens/s" in answers.nth(1).get_by_test_id("answer-stats").inner_text()
        r.screenshot("playground")

        # Adapters: derive one at half scale (confirmed), then delete it (confirmed); import an archive of the
        # trained adapter's files and watch its canary decide.
        page.on("dialog", lambda dialog: dialog.accept())
        r.goto("/ui/adapters")
        card = page.locator(f'article[data-adapter="{adapter}"]')
        card.wait_for()
        card.get_by_label("scale").fill("0.5")
        card.get_by_role("button", name="Derive").click()
        message = page.get_by_test_id("adapters-message")
        message.filter(has_text="succeeded").wait_for(timeout=120_000)
        derived = message.inner_text().split("→")[-1].strip()
        derived_card = page.locator(f'article[data-adapter="{derived}"]')
        derived_card.wait_for()
        assert "derived from" in derived_card.inner_text()
        derived_card.get_by_role("button", name="Delete").click()
        message.filter(has_text=f"{derived} deleted").wait_for()
        store = Store(settings).resolve(Store(settings).adapter_dir(adapter))
        archive = tmp_path / "adapter.tar.gz"
        kept = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors")
        archive.write_bytes(tar_gz({k: v for k, v in files_of(store, "adapter/").items() if k in kept}))
        page.locator("#import-file").set_input_files(str(archive))
        page.locator("#import-suffix").fill("ui")
        page.get_by_role("button", name="Import").click()
        verdict = page.get_by_test_id("import-status")
        verdict.filter(has_text=": ready").wait_for(timeout=120_000)
        assert verdict.inner_text().startswith("imp-ui-")
        r.screenshot("adapters")

        assert r.off_host() == [], r.off_host()
        # The one refused request (the bad file's 422) is logged by Chromium; nothing else went wrong.
        assert r.script_errors() == [], r.script_errors()
    print(f"console end-to-end: {time.monotonic() - started:.1f} s")
