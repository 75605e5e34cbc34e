"""The last few distinct client addresses a token was allowed from, with counts, in the token's view."""

from __future__ import annotations

from typing import Any

import pytest

from tests.admin_api.conftest import proxy_verdict
from tests.conftest import Gateway, GatewayFactory, SettableClock


async def call_from(gateway: Gateway, token: str, address: str, method: str = "GET") -> int:
    response = await gateway.call(token, method=method, headers={"X-Forwarded-For": address})
    await response.read()
    return int(response.status)


async def addresses(gateway: Gateway, token_id: str) -> list[tuple[str, int]]:
    status, view = await gateway.admin_call("GET", f"/v1/tokens/{token_id}")
    assert status == 200, view
    return [(item["address"], item["uses"]) for item in view["recent_addresses"]]


# Redis holds the addresses whatever the store, so its case runs on SQLite alone.
@pytest.mark.parametrize(
    ("store_backend", "shared"),
    [("sqlite", "store"), ("postgresql", "store"), ("sqlite", "redis")],
    indirect=["store_backend"],
)
async def test_the_five_most_recent_addresses_are_kept_with_their_counts(
    start_gateway: GatewayFactory, request: pytest.FixtureRequest, shared: str
) -> None:
    clock = SettableClock()
    options: dict[str, Any] = {"redis_url": request.getfixturevalue("redis_url")} if shared == "redis" else {}
    gateway = await start_gateway(clock=clock, trusted_proxies="127.0.0.1", **options)
    token = await gateway.create_token(access_level="read_only")
    other = await gateway.create_token()
    assert await addresses(gateway, token["id"]) == []

    for number in range(1, 8):  # 10.0.0.1 .. 10.0.0.7, one second apart, 10.0.0.n used n times
        clock.advance(1)
        for _ in range(number):
            assert await call_from(gateway, token["token"], f"10.0.0.{number}") == 200
    await gateway.core.usage.flush()
    assert await addresses(gateway, token["id"]) == [(f"10.0.0.{n}", n) for n in (7, 6, 5, 4, 3)]

    # A request refused by the level is not a use to allow; another token's addresses are its own.
    assert await call_from(gateway, token["token"], "192.0.2.9", method="DELETE") == 403
    assert await call_from(gateway, other["token"], "198.51.100.1") == 200
    clock.advance(1)
    assert await call_from(gateway, token["token"], "10.0.0.3") == 200  # back among the five, counted on
    await gateway.core.usage.flush()
    assert await addresses(gateway, token["id"]) == [(f"10.0.0.{n}", c) for n, c in ((3, 4), (7, 7), (6, 6), (5, 5), (4, 4))]
    assert await addresses(gateway, other["id"]) == [("198.51.100.1", 1)]


async def test_the_peer_address_counts_when_no_proxy_is_trusted(gateway: Gateway) -> None:
    token = await gateway.create_token()
    assert await proxy_verdict(gateway, token["token"]) == (200, "")
    assert await call_from(gateway, token["token"], "10.9.9.9") == 200  # not believed: the peer is the client
    await gateway.core.usage.flush()
    assert await addresses(gateway, token["id"]) == [("127.0.0.1", 2)]
