"""RFC 8259 JSON: what every JSON the service reads from a client is parsed with.

Python's json module accepts `NaN`, `Infinity` and `-Infinity` (no other JSON reader does: Postgres' json type
refuses them, and so does every JSON the API sends back), turns a number past a double's range (`1e999`) into
infinity, and raises RecursionError on deeply nested input.
Here both are a json.JSONDecodeError (a ValueError), which callers already turn into a 4xx.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: valid JSON, but no double holds it (Python would make it inf)
        raise ValueError(f"{text[:40]} is too large a number")
    return value


def loads(data: bytes | str) -> Any:
    """json.loads without NaN/Infinity; too deep a nesting is a decode error too (never a RecursionError)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("JSON nested too deeply", text, 0) from None
    except ValueError as e:  # from _reject_constant
        raise json.JSONDecodeError(str(e), text, 0) from None
