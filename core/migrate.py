"""Run Alembic migrations from code: `python -m core.migrate` upgrades the configured database to head."""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

from core.settings import get_settings

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def check(url: str) -> None:
    """Raise if the models and the migrations disagree."""
    command.check(alembic_config(url))


def main() -> None:
    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.database_url, sys.argv[1] if len(sys.argv) > 1 else "head")


if __name__ == "__main__":
    main()
