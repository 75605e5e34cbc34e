"""The store going bad under a running gateway: its own 503 code on both planes, never a wrong decision.

The SQLite file (and its WAL) is overwritten in place, as a failing disk or a stray `dd` would: the open
connection stays, but every read of the file fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Gateway, GatewayFactory, Upstream


def ruin_sqlite_file(database: Path) -> None:
    for path in database.parent.iterdir():
        if path.name.startswith(database.name):
            size = path.stat().st_size
            with path.open("r+b") as file:
                file.write(b"\xff" * size)


def ruin_the_store(gateway: Gateway) -> None:
    assert gateway.database is not None
    ruin_sqlite_file(gateway.database)


async def _problem(response: object) -> tuple[int, str]:
    body = json.loads(await response.read())  # type: ignore[attr-defined]
    return response.status, body["code"]  # type: ignore[attr-defined]


async def test_store_down_is_a_503_for_a_token_not_in_memory(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    admin = await start_gateway(planes=("admin",))
    proxy = await start_gateway(planes=("proxy",))  # another process: it has never read this token
    token = (await admin.create_token())["token"]
    ruin_the_store(proxy)

    response = await proxy.call(token)

    assert await _problem(response) == (503, "store_unavailable")
    assert response.content_type == "application/problem+json"
    assert upstream.requests == []


async def test_store_down_keeps_a_token_already_in_memory_working(gateway: Gateway) -> None:
    token = (await gateway.create_token())["token"]
    assert (await gateway.call(token)).status == 200
    ruin_the_store(gateway)

    assert (await gateway.call(token)).status == 200
    wrong = await gateway.call(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"))
    assert wrong.status == 401


async def test_store_down_fails_healthz_and_readyz(gateway: Gateway) -> None:
    assert (await gateway.admin_call("GET", "/readyz")) == (
        200, {"status": "ok", "store": "ok", "redis": "not configured"}
    )
    ruin_the_store(gateway)

    status, health = await gateway.admin_call("GET", "/healthz")
    assert (status, health["code"]) == (503, "store_unavailable")
    assert await gateway.admin_call("GET", "/readyz") == (
        503, {"status": "unavailable", "store": "unavailable", "redis": "not configured"}
    )


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/tokens", None),
        ("POST", "/v1/tokens", {"name": "n", "access_level": "read_only"}),
        ("GET", "/v1/audit", None),
    ],
)
async def test_store_down_is_a_503_on_the_admin_api(
    gateway: Gateway, method: str, path: str, body: dict[str, str] | None
) -> None:
    await gateway.create_token()  # the admin key is now known to the authenticator's memory
    ruin_the_store(gateway)

    response = await gateway.admin.request(method, path, json=body, headers=gateway.admin_headers)

    assert await _problem(response) == (503, "store_unavailable")
