"""Alembic environment: the target metadata is core.models; the URL comes from settings unless given."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

import core.models  # noqa: F401  (registers the tables on Base.metadata)
from core.db import Base
from core.settings import get_settings

config = context.config
url = (
    config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url") or get_settings().database_url
)


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection") or create_engine(url)
    if hasattr(connectable, "connect"):
        with connectable.connect() as connection:
            _run(connection)
    else:
        _run(connectable)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    # Batch mode lets the same migrations ALTER tables on SQLite.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
