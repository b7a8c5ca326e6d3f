"""Bounds of what a client may send, so that every value fits the column or type it ends up in.

A number past its column's range is a 422 naming the field, not a database OverflowError (a 500): every integer a
request carries is bounded by the column it is compared with or stored in (32-bit INTEGER, or 64-bit BIGINT).
"""

from __future__ import annotations

MAX_INT32 = 2**31 - 1  # Postgres INTEGER, SQLite's bound parameters are 64-bit but the schema says INTEGER
MIN_INT64, MAX_INT64 = -(2**63), 2**63 - 1  # Postgres BIGINT; also torch / vLLM seeds
