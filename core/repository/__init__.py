"""All SQL lives in these modules; routes and tasks call them."""

from __future__ import annotations

from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Result, Select, select
from sqlalchemy.orm import Session

T = TypeVar("T")


def get_owned(session: Session, model: type[T], tenant_id: str, ident: str) -> T | None:
    """The row with primary key `ident` if `tenant_id` owns it; another tenant's row is as good as absent."""
    row = session.get(model, ident)
    owned: Any = row
    return row if row is not None and owned.tenant_id == tenant_id else None


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched: Session.execute is typed as Result, DML gives a CursorResult."""
    return cast(CursorResult[Any], result).rowcount


def newest_first_page(
    session: Session, model: type[T], query: Select[T], *, limit: int, after: str | None
) -> tuple[list[T], bool]:
    """Keyset page, newest first, continuing after the row with id `after` (OpenAI's `after` cursor).

    The cursor is tenant-scoped like the query: an id of a tenant whose rows the query does not list (another
    tenant's, guessed or leaked) is ignored as if unknown, so the page it gives tells nothing about that row.
    """
    columns: Any = model
    created: Any = columns.created_at
    ident: Any = columns.id
    if after is not None:
        anchor_query = select(created, ident).where(ident == after)
        tenant: Any = getattr(model, "tenant_id", None)
        if tenant is not None:
            anchor_query = anchor_query.where(tenant.in_(query.with_only_columns(tenant)))
        anchor = session.execute(anchor_query).first()
        if anchor is not None:
            anchor_created, anchor_id = anchor
            query = query.where((created < anchor_created) | ((created == anchor_created) & (ident < anchor_id)))
    rows = list(session.scalars(query.order_by(created.desc(), ident.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
