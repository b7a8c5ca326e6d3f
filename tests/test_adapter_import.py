"""POST /adapters: an adapter made elsewhere is unpacked safely, checked, and served only after a worker's
canary shows it changes the base model's output. Bad archives are a 4xx naming the member, and leave nothing."""

from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.storage import sha256_file
from tests.support.adapters import files_of, peft_adapter, tar_gz
from tests.support.stack import Stack


def post_archive(stack: Stack, data: bytes, filename: str = "adapter.tar.gz", **form: str) -> Any:
    return stack.client.post("/adapters", files={"file": (filename, data)}, data=form)


def wait_for_verdict(stack: Stack, name: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        adapter = stack.client.get(f"/adapters/{name}").json()
        if adapter["status"] != "validating":
            return adapter
        time.sleep(0.25)
    raise AssertionError(f"adapter {name} still validating after {timeout}s")


@pytest.fixture(scope="module")
def adapters(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("import")
    base = stack.settings.base_model
    return {
        "trained": peft_adapter(base, root / "trained", trained=True),
        "untrained": peft_adapter(base, root / "untrained", trained=False),
    }


def test_imported_adapter_passes_its_canary_and_is_ready(stack: Stack, adapters: dict[str, Path]) -> None:
    source = adapters["trained"]
    response = post_archive(stack, tar_gz(files_of(source, "my-adapter/")), suffix="ext")
    assert response.status_code == 202, response.text
    adapter = response.json()
    assert adapter["status"] == "validating" and adapter["servable"] is False
    assert adapter["name"].startswith("imp-ext-") and adapter["rank"] == 4 and adapter["job_id"] is None
    # Only the two adapter files are kept: the weights byte for byte, the config rewritten from the allowlist
    # (core/adapter_files.sanitized_adapter_config); their sha256s are recorded.
    assert adapter["files"]["adapter_model.safetensors"] == sha256_file(source / "adapter_model.safetensors")
    assert set(adapter["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    # Not usable while validating.
    assert stack.client.post("/generate", params={"adapter": adapter["name"]}, json={"prompt": "hi"}).status_code == 422

    done = wait_for_verdict(stack, adapter["name"])
    assert done["status"] == "ready" and done["servable"] is True, done
    assert done["servable_reason"] is None
    assert adapter["name"] in [a["name"] for a in stack.client.get("/adapters", params={"limit": 100}).json()["data"]]


def test_an_adapter_that_changes_nothing_is_unhealthy_and_never_served(stack: Stack, adapters: dict[str, Path]) -> None:
    response = post_archive(stack, tar_gz(files_of(adapters["untrained"])))
    assert response.status_code == 202, response.text
    done = wait_for_verdict(stack, response.json()["name"])
    assert done["status"] == "unhealthy" and done["servable"] is False, done
    assert "canary" in done["servable_reason"] and "equals the base model" in done["servable_reason"]
    refused = stack.client.post("/generate", params={"adapter": done["name"]}, json={"prompt": "hi"})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "adapter_not_servable"
    models = [m["id"] for m in stack.client.get("/v1/models").json()["data"]]
    assert done["name"] not in models


def _zip(members: dict[str, bytes], *, symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _with_config(source: Path, **changes: Any) -> dict[str, bytes]:
    files = files_of(source)
    config = json.loads(files["adapter_config.json"])
    config.update(changes)
    files["adapter_config.json"] = json.dumps(config).encode()
    return files


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_bad_archives_are_refused_naming_the_member_and_leave_nothing(
    stack: Stack, adapters: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = files_of(adapters["trained"])
    other_base = peft_adapter_for_other_shapes(tmp_path)
    cases: dict[str, tuple[Callable[[], bytes], int, str]] = {
        "pickle weights": (
            lambda: tar_gz({**good, "adapter_model.bin": b"\x80\x04pickle"}),
            422,
            "file:adapter_model.bin",
        ),
        "pickle only": (
            lambda: tar_gz({"adapter_config.json": good["adapter_config.json"], "training_args.bin": b"\x80\x04"}),
            422,
            "file:training_args.bin",
        ),
        "path traversal": (
            lambda: tar_gz({"../evil/adapter_config.json": b"{}", **good}),
            422,
            "file:../evil/adapter_config.json",
        ),
        "absolute path": (lambda: tar_gz({"/tmp/adapter_config.json": b"{}"}), 422, "file:/tmp/adapter_config.json"),
        "symlink": (
            lambda: tar_gz(good, links={"link.safetensors": (tarfile.SYMTYPE, b"/etc/passwd")}),
            422,
            "file:link.safetensors",
        ),
        "hard link": (
            lambda: tar_gz(good, links={"hard": (tarfile.LNKTYPE, b"adapter_config.json")}),
            422,
            "file:hard",
        ),
        "zip symlink": (
            lambda: _zip(good, symlink="adapter_model.safetensors.lnk"),
            422,
            "file:adapter_model.safetensors.lnk",
        ),
        "zip traversal": (
            lambda: _zip({"a/../../x/adapter_config.json": b"{}"}),
            422,
            "file:a/../../x/adapter_config.json",
        ),
        "not an archive": (lambda: b"just some bytes", 422, "file"),
        "no weights": (
            lambda: tar_gz({"adapter_config.json": good["adapter_config.json"]}),
            422,
            "file:adapter_model.safetensors",
        ),
        "weights not safetensors": (
            lambda: tar_gz({**good, "adapter_model.safetensors": b"\x00" * 64}),
            422,
            "file:adapter_model.safetensors",
        ),
        "config not json": (lambda: tar_gz({**good, "adapter_config.json": b"{oops"}), 422, "file:adapter_config.json"),
        "not LoRA": (
            lambda: tar_gz(_with_config(adapters["trained"], peft_type="PREFIX_TUNING")),
            422,
            "file:adapter_config.json",
        ),
        "rank too high": (lambda: tar_gz(_with_config(adapters["trained"], r=4096)), 422, "file:adapter_config.json"),
        "other base model": (
            lambda: tar_gz(_with_config(adapters["trained"], base_model_name_or_path="org/other-7b")),
            422,
            "file:adapter_config.json:base_model_name_or_path",
        ),
        "shapes of another model": (lambda: tar_gz(files_of(other_base)), 422, "file:adapter_model.safetensors"),
        "two adapters": (
            lambda: tar_gz({**files_of(adapters["trained"], "a/"), **files_of(adapters["trained"], "b/")}),
            422,
            "file",
        ),
    }
    store = stack.settings.store
    before = stack.client.get("/adapters", params={"limit": 100}).json()["data"]
    before_dirs = sorted(p.name for p in (store / "adapters").iterdir())
    for label, (build, status, param) in cases.items():
        response = post_archive(stack, build())
        assert response.status_code == status, (label, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (label, error)
        assert error["message"], label

    monkeypatch.setattr(stack.settings, "max_adapter_upload_bytes", 1024)
    too_big = post_archive(stack, tar_gz(good))
    assert too_big.status_code == 413 and too_big.json()["error"]["param"] == "file", too_big.text

    assert stack.client.get("/adapters", params={"limit": 100}).json()["data"] == before
    assert sorted(p.name for p in (store / "adapters").iterdir()) == before_dirs
    assert not any((store / "tmp").iterdir())  # every staging dir was removed


def peft_adapter_for_other_shapes(tmp_path: Path) -> Path:
    """A LoRA adapter whose tensors name this model's layers but with another hidden size."""
    import torch
    from safetensors.torch import save_file

    directory = tmp_path / "other-shapes"
    directory.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{prefix}.lora_A.weight": torch.zeros(4, 999), f"{prefix}.lora_B.weight": torch.zeros(999, 4)},
        str(directory / "adapter_model.safetensors"),
    )
    return directory


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_an_adapter_whose_canary_never_ran_is_settled_unhealthy(stack: Stack, adapters: dict[str, Path]) -> None:
    """The canary's worker died on every attempt: the reconciler fails the operation and the adapter with it,
    instead of leaving it `validating` for ever."""
    from datetime import timedelta

    from sqlalchemy import update

    from core.db import session_scope
    from core.models import AdapterOperation, WorkStatus, utcnow

    stack.stop_worker()  # nobody runs the canary: what a worker lost on its last attempt leaves behind
    try:
        name = post_archive(stack, tar_gz(files_of(adapters["trained"]))).json()["name"]
        expired = utcnow() - timedelta(seconds=1)
        with session_scope(stack.settings.database_url) as s:
            s.execute(
                update(AdapterOperation)
                .where(AdapterOperation.source_adapter == name, AdapterOperation.kind == "canary")
                .values(
                    status=WorkStatus.running,
                    lease_owner="a-dead-worker",
                    lease_expires_at=expired,
                    attempt_count=AdapterOperation.max_attempts,
                )
            )
        done = wait_for_verdict(stack, name, timeout=60)  # the API's reconciler runs every 2 s here
        assert done["status"] == "unhealthy" and done["servable"] is False, done
        assert done["servable_reason"].startswith("canary could not run: the worker running this stopped answering")
    finally:
        stack.start_worker()


def _config_text(source: Path, **replacements: str) -> bytes:
    """adapter_config.json with fields set to raw JSON text (NaN, Infinity: what json.dumps will not write)."""
    text = json.dumps(json.loads(files_of(source)["adapter_config.json"]))
    for key, raw in replacements.items():
        text = text.replace("{", f'{{"{key}": {raw}, ', 1)
    return text.encode()


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_hostile_config_and_weights_are_422_naming_the_field(stack: Stack, adapters: dict[str, Path]) -> None:
    """Values of the wrong type, NaN / Infinity, and safetensors headers of the wrong shape were 500s."""
    from tests.hostile.archives import safetensors

    source = adapters["trained"]
    good = files_of(source)
    config_cases = {
        "lora_alpha a string": (
            json.dumps({**json.loads(good["adapter_config.json"]), "lora_alpha": "x"}).encode(),
            "lora_alpha",
        ),
        "r Infinity": (_config_text(source, r="Infinity"), "Infinity"),
        "r NaN": (_config_text(source, r="NaN"), "NaN"),
        "rank_pattern a list": (
            json.dumps({**json.loads(good["adapter_config.json"]), "rank_pattern": []}).encode(),
            "rank_pattern",
        ),
        "rank_pattern of strings": (
            json.dumps({**json.loads(good["adapter_config.json"]), "rank_pattern": {"q_proj": "8"}}).encode(),
            "rank_pattern",
        ),
        "alpha_pattern Infinity": (_config_text(source, alpha_pattern='{"q_proj": -Infinity}'), "Infinity"),
        "target_modules of numbers": (
            json.dumps({**json.loads(good["adapter_config.json"]), "target_modules": [1, 2]}).encode(),
            "target_modules",
        ),
        "nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    }
    for label, (config, named) in config_cases.items():
        response = post_archive(stack, tar_gz({**good, "adapter_config.json": config}))
        assert response.status_code == 422, (label, response.text)
        error = response.json()["error"]
        assert error["param"] == "file:adapter_config.json" and named in error["message"], (label, error)

    tensor = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    weights_cases = {
        "header is a list": (safetensors([]), "must be a JSON object"),
        "data_offsets [0]": (
            safetensors({tensor: {"dtype": "F32", "shape": [4, 8], "data_offsets": [0]}}),
            "data_offsets",
        ),
        "shape of strings": (
            safetensors({tensor: {"dtype": "F32", "shape": ["4", "8"], "data_offsets": [0, 0]}}),
            "shape",
        ),
        "entry not an object": (safetensors({tensor: 5}), tensor),
        "header NaN": (safetensors(b'{"x": NaN}'), "NaN"),
        "header over the cap": (
            safetensors({}, declared_len=stack.settings.max_safetensors_header_bytes + 1),
            "TUNESERVE_MAX_SAFETENSORS_HEADER_BYTES",
        ),
        "header cut short": (safetensors({}, declared_len=1000), "truncated"),
    }
    for label, (weights, named) in weights_cases.items():
        response = post_archive(stack, tar_gz({**good, "adapter_model.safetensors": weights}))
        assert response.status_code == 422, (label, response.text)
        error = response.json()["error"]
        assert error["param"] == "file:adapter_model.safetensors" and named in error["message"], (label, error)


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_archive_bombs_cost_bounded_time_and_leave_nothing(
    stack: Stack, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each bomb kind is a 413 naming the bound it hit, within seconds, with nothing stored. Before, 100k empty
    members took 5 s of the API's own CPU (getmembers()), and a 3 MB upload made it decompress 3 GiB (12 s)."""
    from tests.hostile import archives

    good = files_of(adapters["trained"])
    settings = stack.settings
    store = settings.store
    before = stack.client.get("/adapters", params={"limit": 100}).json()["data"]
    cases: dict[str, tuple[Callable[[], bytes], dict[str, Any], str]] = {
        "100k empty members (gzip)": (lambda: archives.many_empty_members(100_000), {}, "MAX_ARCHIVE_MEMBERS"),
        "100k empty members (bz2)": (
            lambda: archives.many_empty_members(100_000, compress="bz2"),
            {},
            "MAX_ARCHIVE_MEMBERS",
        ),
        "zip of 5000 members": (lambda: archives.zip_of_many_members(5000), {}, "MAX_ARCHIVE_MEMBERS"),
        "member declaring 100 GiB over gzip zeros": (archives.declared_huge_over_zeros, {}, "MAX_ADAPTER_UPLOAD_BYTES"),
        "3 GiB of gzip zeros to skip": (
            lambda: archives.slow_to_skip(3072, good),
            {"adapter_unpack_timeout_seconds": 1, "max_adapter_upload_bytes": 4 * 1024**3},
            "ADAPTER_UNPACK_TIMEOUT_SECONDS",
        ),
        "512 MiB long name": (
            lambda: archives.long_name_bomb(512),
            {"adapter_unpack_memory_bytes": 256 * 1024**2, "max_adapter_upload_bytes": 4 * 1024**3},
            "ADAPTER_UNPACK_MEMORY_BYTES",
        ),
        "headers past the header budget": (
            lambda: archives.many_empty_members(500),
            {"max_archive_header_bytes": 64 * 1024},
            "MAX_ARCHIVE_HEADER_BYTES",
        ),
    }
    for label, (build, overrides, setting) in cases.items():
        with monkeypatch.context() as patch:
            for key, value in overrides.items():
                patch.setattr(settings, key, value)
            data = build()
            started = time.monotonic()
            response = post_archive(stack, data)
            elapsed = time.monotonic() - started
        assert response.status_code == 413, (label, response.text)
        error = response.json()["error"]
        assert error["code"] == "payload_too_large" and f"TUNESERVE_{setting}" in error["message"], (label, error)
        assert error["param"].startswith("file"), (label, error)
        assert elapsed < 10, f"{label}: {elapsed:.1f} s"
    assert stack.client.get("/adapters", params={"limit": 100}).json()["data"] == before
    assert not any((store / "tmp").iterdir())
