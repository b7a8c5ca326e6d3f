"""All SQL lives in these modules; routes and tasks call them."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

T = TypeVar("T")


def get_owned(session: Session, model: type[T], tenant_id: str, ident: str) -> T | None:
    """The row with primary key `ident` if `tenant_id` owns it; another tenant's row is as good as absent."""
    row = session.get(model, ident)
    return row if row is not None and getattr(row, "tenant_id") == tenant_id else None


def newest_first_page(
    session: Session, model: type[T], query: Select[tuple[T]], *, limit: int, after: str | None
) -> tuple[list[T], bool]:
    """Keyset page, newest first, continuing after the row with id `after` (OpenAI's `after` cursor)."""
    created: Any = getattr(model, "created_at")
    ident: Any = getattr(model, "id")
    if after is not None:
        anchor = session.get(model, after)
        if anchor is not None:
            anchor_created, anchor_id = getattr(anchor, "created_at"), getattr(anchor, "id")
            query = query.where((created < anchor_created) | ((created == anchor_created) & (ident < anchor_id)))
    rows = list(session.scalars(query.order_by(created.desc(), ident.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
