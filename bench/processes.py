"""What the benchmarks that run a whole stack as processes share: ports, a temporary Postgres database, a
restartable process, and the commands of Redis, the API and a worker."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from pathlib import Path

import psycopg

from core.processes import start_in_own_group, stop_process_group

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("TUNESERVE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def create_database(prefix: str) -> tuple[str, str]:
    """A new, empty Postgres database: its name and its psycopg URL (`postgresql://...`)."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlalchemy_url(pg_url: str) -> str:
    return pg_url.replace("postgresql://", "postgresql+psycopg://", 1)


def redis_command(port: int) -> list[str]:
    """A private redis-server that keeps nothing: a restart loses every message, as one without AOF does."""
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


class Proc:
    """A restartable child process in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = start_in_own_group(self.argv, env=self.env, log=self.log, cwd=ROOT)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Signal the process group, then SIGKILL it after 30 s."""
        if self.process is not None:
            stop_process_group(self.process, sig)
            self.process = None
