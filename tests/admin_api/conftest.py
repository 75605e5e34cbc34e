"""What the admin tests share: reading problem+json answers, the proxy's verdict, and bounded polling."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import ClientResponse

from tests.conftest import Gateway

T = TypeVar("T")

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_MEMBERS = {"type", "title", "status", "detail", "code"}
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
NO_FIELD = object()


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def admin_request(gateway: Gateway, method: str, path: str, **kwargs: Any) -> ClientResponse:
    """A raw admin request with the admin key, for tests that look at headers or the content type."""
    headers = {**gateway.admin_headers, **kwargs.pop("headers", {})}
    response = await gateway.admin.request(method, path, headers=headers, **kwargs)
    await response.read()
    return response


async def expect_problem(
    response: ClientResponse, status: int, code: str, field: object = NO_FIELD
) -> dict[str, Any]:
    """Assert an RFC 9457 answer with `status` and `code` (and `field`, when given); return its body."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == PROBLEM_CONTENT_TYPE, text
    body: dict[str, Any] = await response.json(content_type=PROBLEM_CONTENT_TYPE)
    assert PROBLEM_MEMBERS <= set(body), body
    assert body["status"] == status
    assert body["code"] == code, body
    assert body["type"].endswith(code)
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not NO_FIELD:
        assert body.get("field") == field, body
    return body


async def proxy_verdict(
    gateway: Gateway, token: str, path: str = "/api/posts", method: str = "GET"
) -> tuple[int, str]:
    """What a client presenting `token` sees: the status, and the problem code ('' when it got through)."""
    response = await gateway.call(token, path, method)
    body = await response.json(content_type=None)
    return response.status, (body["code"] if response.status >= 400 else "")


async def audit_events(gateway: Gateway, token_id: str | None = None) -> list[dict[str, Any]]:
    params = {"limit": "500"} if token_id is None else {"limit": "500", "token_id": token_id}
    status, body = await gateway.admin_call("GET", "/v1/audit", params=params)
    assert status == 200, body
    return list(body["items"])


async def audit_actions(gateway: Gateway, token_id: str | None = None) -> list[str]:
    return [event["action"] for event in await audit_events(gateway, token_id)]


async def token_view(gateway: Gateway, token_id: str) -> dict[str, Any]:
    status, body = await gateway.admin_call("GET", f"/v1/tokens/{token_id}")
    assert status == 200, body
    return dict(body)


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, attempts: int = 100, pause: float = 0.05
) -> T:
    """The first non-None answer of `probe`, asked at most `attempts` times."""
    for _ in range(attempts):
        answer = await probe()
        if answer is not None:
            return answer
        await asyncio.sleep(pause)
    raise AssertionError(f"no answer after {attempts} attempts")
