"""The response type the tests see: Starlette's TestClient uses httpx2 when it is installed (openai pulls it in),
httpx otherwise; servers the tests reach over real HTTP answer httpx responses."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import httpx
    import httpx2

Response: TypeAlias = "httpx.Response | httpx2.Response"
