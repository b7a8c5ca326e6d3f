"""The console in a real Chromium, without training: sign-in, tenant isolation, a 422 beside its field, offline
pages (every request goes to the API's host), keyboard and phone layout. Screenshots go to var/screenshots."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.support.browser import RecordedPage, recorded_page, sign_in
from tests.support.stack import bearer
from tests.ui.conftest import ConsoleStack

pytestmark = pytest.mark.browser

PAGES = ("/ui/datasets", "/ui/jobs", "/ui/adapters", "/ui/playground")
TINY_DATASET = b"".join(
    b'{"prompt": "Classify the sentiment: %s", "completion": "%s"}\n' % (w, label)
    for w, label in ((b"good", b"positive"), (b"bad", b"negative")) * 4
)


def queued_job(stack: ConsoleStack, key: str) -> dict[str, Any]:
    """A dataset and a job of the key's tenant, through the API (no worker runs: it stays queued)."""
    with httpx.Client(base_url=stack.url, headers=bearer(key), timeout=30) as client:
        dataset = client.post("/datasets", files={"file": ("tiny.jsonl", TINY_DATASET)})
        assert dataset.status_code == 201, dataset.text
        job = client.post(
            "/jobs",
            json={
                "dataset_id": dataset.json()["id"],
                "hyperparameters": {"max_steps": 2},
                "evaluation": {"enabled": False},
            },
        )
        assert job.status_code == 201, job.text
        return dict(job.json())


def assert_on_host(recorded: RecordedPage) -> None:
    assert recorded.requests, "no request was recorded"
    assert recorded.off_host() == [], f"requests left the API's host: {recorded.off_host()}"
    assert recorded.hosts() == {recorded.base_url}


def test_a_wrong_key_is_refused(browser: Any, console_stack: ConsoleStack) -> None:
    with recorded_page(browser, console_stack.url) as r:
        # Without a key every console page sends you to sign in.
        r.goto("/ui/jobs")
        r.page.wait_for_url(re.compile(r"/ui\?next="))
        r.page.get_by_label("API key").fill("tsk_not-a-key")
        r.page.get_by_role("button", name="Sign in").click()
        error = r.page.locator("#api-key-error")
        error.wait_for(state="visible")
        assert "key" in error.inner_text().lower()
        assert r.page.locator("#api-key").get_attribute("aria-invalid") == "true"
        assert r.page.evaluate("sessionStorage.getItem('tuneserve.apiKey')") is None
        assert "/ui/jobs" not in r.page.url.split("?")[0]
        r.screenshot("signin-refused")
        assert_on_host(r)


def test_tenant_b_never_sees_tenant_a_job(browser: Any, console_stack: ConsoleStack) -> None:
    job = queued_job(console_stack, console_stack.key_a)
    with recorded_page(browser, console_stack.url) as r:
        sign_in(r, console_stack.key_a)
        r.page.get_by_role("link", name=job["id"]).wait_for()
        r.screenshot("jobs")
        r.page.get_by_role("link", name=job["id"]).click()
        r.page.get_by_test_id("job-status").wait_for()
        assert r.page.get_by_test_id("job-status").inner_text() == "queued"
        r.screenshot("job-queued")
    with recorded_page(browser, console_stack.url) as r:
        sign_in(r, console_stack.key_b)
        r.page.get_by_text("None yet.").first.wait_for()
        r.page.wait_for_load_state("networkidle")
        assert job["id"] not in r.page.content()
        # Not even by its URL: the API answers 404 for another tenant's job, and the page says so.
        r.goto(f"/ui/jobs/{job['id']}", wait_until="load")
        error = r.page.get_by_test_id("job-error")
        error.wait_for(state="visible")
        assert "No job" in error.inner_text()
        assert r.page.get_by_test_id("job-status").count() == 0
        # Nor in its event stream.
        status = r.page.evaluate(
            """async (id) => (await fetch(`/jobs/${id}/events/stream`,
                 {headers: {Authorization: `Bearer ${sessionStorage.getItem('tuneserve.apiKey')}`}})).status""",
            job["id"],
        )
        assert status == 404
        assert_on_host(r)


def test_a_422_lands_next_to_its_field(browser: Any, console_stack: ConsoleStack) -> None:
    queued_job(console_stack, console_stack.key_a)  # so the form has a dataset to choose
    with recorded_page(browser, console_stack.url) as r:
        sign_in(r, console_stack.key_a)
        form = r.page.get_by_test_id("job-form")
        r.page.locator("#f-dataset_id option").first.wait_for(state="attached")
        # A rank vLLM cannot serve: the schema allows 1..4096, the API refuses 3 and names the field.
        form.get_by_label("lora_r").fill("3")
        form.get_by_role("button", name="Start training").click()
        error = r.page.locator('[data-field="hyperparameters.lora_r"]')
        error.wait_for(state="visible")
        assert "lora_r" in error.inner_text()
        field = r.page.locator("#f-hyperparameters-lora_r")
        assert field.get_attribute("aria-invalid") == "true"
        assert error.get_attribute("id") in (field.get_attribute("aria-describedby") or "")
        assert r.page.evaluate("document.activeElement.id") == "f-hyperparameters-lora_r"
        r.screenshot("job-form-422")
        # One in the folded "advanced" part opens it and lands there too.
        field.fill("8")
        r.page.locator("#advanced summary").click()
        r.page.locator("#f-hyperparameters-keep_checkpoints").fill("99")
        r.page.locator("#advanced summary").click()  # fold it again
        form.get_by_role("button", name="Start training").click()
        error = r.page.locator('[data-field="hyperparameters.keep_checkpoints"]')
        error.wait_for(state="visible")
        assert r.page.locator("#advanced").get_attribute("open") is not None
        assert r.page.evaluate("document.activeElement.id") == "f-hyperparameters-keep_checkpoints"


def test_pages_and_docs_make_no_request_off_the_api_host(browser: Any, console_stack: ConsoleStack) -> None:
    with recorded_page(browser, console_stack.url) as r:
        r.goto("/ui")
        r.screenshot("signin")
        sign_in(r, console_stack.key_a)
        for path in PAGES:
            r.goto(path)
            r.page.locator("main h1").wait_for()
            r.screenshot(path.strip("/").replace("/", "-"))
        assert r.script_errors() == [] and r.console_errors == []
        assert_on_host(r)
    with recorded_page(browser, console_stack.url) as r:
        # /docs works offline: Swagger UI's script, style and favicon come from the API itself.
        r.goto("/docs")
        r.page.locator(".opblock-summary-path", has_text="/jobs/{job_id}/events/stream").first.wait_for()
        r.screenshot("docs")
        assert_on_host(r)
        assert any(u.endswith("swagger-ui-bundle.js") for u in r.requests)


def test_sign_out_forgets_the_key(browser: Any, console_stack: ConsoleStack) -> None:
    with recorded_page(browser, console_stack.url) as r:
        sign_in(r, console_stack.key_a)
        r.page.get_by_test_id("sign-out").click()
        r.page.wait_for_url(re.compile(r"/ui$"))
        assert r.page.evaluate("sessionStorage.getItem('tuneserve.apiKey')") is None
        r.goto("/ui/adapters")
        r.page.wait_for_url(re.compile(r"/ui\?next="))


def test_keyboard_and_phone(browser: Any, console_stack: ConsoleStack) -> None:
    with recorded_page(browser, console_stack.url) as r:
        r.goto("/ui")
        # The key field is reachable by keyboard and labelled; Enter submits.
        r.page.keyboard.press("Tab")
        assert r.page.evaluate("document.activeElement.textContent.trim()") == "Skip to content"
        r.page.locator("#api-key").focus()
        r.page.keyboard.type(console_stack.key_a)
        r.page.keyboard.press("Enter")
        r.page.wait_for_url("**/ui/jobs")
        r.wait_ready()
        # Every form control on the job form has a label.
        r.page.locator("#f-hyperparameters-lora_r").wait_for()
        unlabelled = r.page.evaluate(
            """() => [...document.querySelectorAll('main input, main select, main textarea')]
                 .filter((el) => el.type !== 'hidden' && !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
                 .map((el) => el.id || el.outerHTML)"""
        )
        assert unlabelled == []
    with recorded_page(
        browser, console_stack.url, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    ) as r:
        sign_in(r, console_stack.key_a)
        for path in PAGES:
            r.goto(path)
            # Nothing wider than the phone but the tables, which scroll inside their own box.
            overflow = r.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 1, (path, overflow)
        r.goto("/ui/jobs")
        r.screenshot("jobs-phone")


def test_dataset_list_and_preview(browser: Any, console_stack: ConsoleStack) -> None:
    job = queued_job(console_stack, console_stack.key_a)
    with recorded_page(browser, console_stack.url) as r:
        sign_in(r, console_stack.key_a)
        r.goto("/ui/datasets")
        row = r.page.get_by_test_id("datasets-table").locator("tr", has_text=job["dataset_id"])
        assert "prompt_completion" in row.inner_text() or "prompt" in row.inner_text()
        button = row.get_by_role("button", name="Preview")
        button.click()
        preview = r.page.get_by_test_id(f"preview-{job['dataset_id']}")
        preview.wait_for(state="visible")
        assert "train: first 3 rows" in preview.inner_text()
        assert "Classify the sentiment" in preview.inner_text()
        assert row.get_by_role("button", name="Hide rows").get_attribute("aria-expanded") == "true"
        r.screenshot("datasets-preview")
        assert_on_host(r)


def test_cancel_a_queued_job_from_its_page(browser: Any, console_stack: ConsoleStack) -> None:
    job = queued_job(console_stack, console_stack.key_a)
    with recorded_page(browser, console_stack.url) as r:
        sign_in(r, console_stack.key_a)
        r.goto(f"/ui/jobs/{job['id']}", wait_until="load")
        status = r.page.get_by_test_id("job-status")
        status.filter(has_text="queued").wait_for()
        r.page.once("dialog", lambda dialog: dialog.dismiss())  # "no": nothing happens
        r.page.get_by_role("button", name="Cancel job").click()
        assert status.inner_text() == "queued"
        r.page.once("dialog", lambda dialog: dialog.accept())
        r.page.get_by_role("button", name="Cancel job").click()
        status.filter(has_text="cancelled").wait_for()
        # Alpine applies the button's x-show in its own effect, after the status text: wait for it, don't sample.
        r.page.get_by_role("button", name="Cancel job").wait_for(state="hidden", timeout=5000)
    with httpx.Client(base_url=console_stack.url, headers=bearer(console_stack.key_a), timeout=30) as client:
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"
