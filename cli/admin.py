"""`tuneserve admin`: tenants and API keys, written straight to the database of TUNESERVE_DATABASE_URL.

An operator's command, run where the database is reachable (the API host, or `docker compose run api`);
it does not go through the API, so no key is needed to make the first one.
"""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from rich.console import Console

from core.auth import create_tenant, mint_key
from core.db import session_scope
from core.errors import TuneserveError
from core.repository import tenants as tenants_repo
from core.settings import get_settings

admin_app = typer.Typer(no_args_is_help=True, help="Tenants and API keys (operators; talks to the database).")


def _database_url() -> str:
    settings = get_settings()
    settings.ensure_dirs()
    return settings.database_url


def _refuse(e: TuneserveError) -> NoReturn:
    Console(stderr=True).print(f"[red]error:[/red] {e.message}", highlight=False)
    raise typer.Exit(1)


@admin_app.command("create-tenant")
def create_tenant_command(name: Annotated[str, typer.Argument(help="A unique tenant name")]) -> None:
    """Add a tenant; its resources are invisible to every other tenant."""
    try:
        with session_scope(_database_url()) as session:
            tenant_id = create_tenant(session, name).id
    except TuneserveError as e:
        _refuse(e)
    typer.echo(f"{tenant_id} {name}")


@admin_app.command("create-key")
def create_key_command(
    tenant: Annotated[str, typer.Argument(help="The tenant's name ('default' always exists)")],
    label: Annotated[str, typer.Option(help="A note to tell keys apart, e.g. who holds it")] = "",
) -> None:
    """Mint an API key for the tenant and print it once: only its sha256 is stored."""
    try:
        with session_scope(_database_url()) as session:
            key = mint_key(session, tenant, label=label)
    except TuneserveError as e:
        _refuse(e)
    Console(stderr=True).print(f"key {key.id} for tenant {key.tenant}; it is shown only now:", highlight=False)
    typer.echo(key.secret)


@admin_app.command("revoke-key")
def revoke_key_command(key_id: Annotated[str, typer.Argument(help="The key's id (from list-keys)")]) -> None:
    """Revoke a key: its next request gets 401."""
    with session_scope(_database_url()) as session:
        revoked = tenants_repo.revoke_key(session, key_id)
    if not revoked:
        Console(stderr=True).print(f"[red]error:[/red] no active key with id {key_id!r}", highlight=False)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@admin_app.command("list-keys")
def list_keys_command() -> None:
    """Every key, one per line (tab-separated, for scripts): id, tenant, label, first characters, created, revoked."""
    typer.echo("\t".join(("id", "tenant", "label", "prefix", "created", "revoked")))
    with session_scope(_database_url()) as session:
        for key, tenant in tenants_repo.list_keys(session):
            revoked = key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "-"
            fields = (
                key.id,
                tenant.name,
                key.label or "-",
                key.prefix + "...",
                key.created_at.isoformat(timespec="seconds"),
                revoked,
            )
            typer.echo("\t".join(fields))
