"""A rotation's grace period, seen by the admin: the previous secret's use tracked apart from the new one's,
and the grace ended early with POST /v1/tokens/{id}/end-grace, through real proxies."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as redis

from tests.admin_api.conftest import admin_request, audit_events, expect_problem, proxy_verdict, rfc3339
from tests.conftest import Gateway, GatewayFactory, SettableClock, both_store_backends, eventually

OK = (200, "")
INVALID = (401, "invalid_token")


async def shown(gateway: Gateway, token_id: str) -> dict[str, Any]:
    status, view = await gateway.admin_call("GET", f"/v1/tokens/{token_id}")
    assert status == 200, view
    return dict(view)


async def rotate(gateway: Gateway, token_id: str, grace_seconds: int = 3600) -> dict[str, Any]:
    status, rotated = await gateway.admin_call(
        "POST", f"/v1/tokens/{token_id}/rotate", json={"grace_seconds": grace_seconds}
    )
    assert status == 200, rotated
    return dict(rotated)


@both_store_backends
async def test_previous_secret_use_is_tracked_apart_from_the_new_ones(start_gateway: GatewayFactory) -> None:
    clock = SettableClock()
    gateway = await start_gateway(clock=clock)
    created = await gateway.create_token()
    assert await proxy_verdict(gateway, created["token"]) == OK  # before the rotation: not the previous secret's
    rotated = await rotate(gateway, created["id"])
    await gateway.core.usage.flush()
    assert (await shown(gateway, created["id"]))["previous_secret"] == {
        "last_used_at": None, "last_used_ip": None, "uses": 0
    }

    clock.advance(-180)  # the gateway's clock stamps the uses: three minutes ago, then one minute ago
    assert await proxy_verdict(gateway, created["token"]) == OK
    clock.advance(120)
    assert await proxy_verdict(gateway, created["token"]) == OK
    clock.advance(60)
    for _ in range(3):
        assert await proxy_verdict(gateway, rotated["token"]) == OK
    await gateway.core.usage.flush()

    view = await shown(gateway, created["id"])
    assert view["previous_secret"] == {
        "last_used_at": rfc3339(clock.now - timedelta(seconds=60)),
        "last_used_ip": "127.0.0.1",
        "uses": 2,
    }
    # The new secret's use is the token's own; every request counts as allowed.
    assert view["last_used_at"] == rfc3339(clock.now)
    status, usage = await gateway.admin_call("GET", f"/v1/tokens/{created['id']}/usage")
    assert usage["totals"]["allowed"] == 6
    status, listing = await gateway.admin_call("GET", "/v1/tokens")
    assert listing["items"][0]["previous_secret"]["uses"] == 2

    # Flushed again: added up; the earlier use keeps its place as the last one only if it is later.
    clock.advance(-3600)
    assert await proxy_verdict(gateway, created["token"]) == OK
    await gateway.core.usage.flush()
    assert (await shown(gateway, created["id"]))["previous_secret"] == {**view["previous_secret"], "uses": 3}
    clock.advance(3600 + 1)

    # A new rotation starts afresh: its previous secret is the one issued by the first rotation.
    again = await rotate(gateway, created["id"])
    await gateway.core.usage.flush()
    assert (await shown(gateway, created["id"]))["previous_secret"]["uses"] == 0
    assert await proxy_verdict(gateway, rotated["token"]) == OK
    await gateway.core.usage.flush()
    assert (await shown(gateway, created["id"]))["previous_secret"]["uses"] == 1
    assert await proxy_verdict(gateway, again["token"]) == OK


async def test_without_a_grace_the_view_has_no_previous_secret(start_gateway: GatewayFactory) -> None:
    clock = SettableClock()
    gateway = await start_gateway(clock=clock)
    created = await gateway.create_token()
    assert "previous_secret" not in await shown(gateway, created["id"])
    await rotate(gateway, created["id"], grace_seconds=0)
    assert "previous_secret" not in await shown(gateway, created["id"])
    await rotate(gateway, created["id"], grace_seconds=60)
    assert "previous_secret" in await shown(gateway, created["id"])
    clock.advance(61)  # the grace has ended by the admin's clock
    assert "previous_secret" not in await shown(gateway, created["id"])


async def test_end_grace_refuses_the_previous_secret_at_once_on_every_proxy(
    start_gateway: GatewayFactory, redis_url: str
) -> None:
    first = await start_gateway(redis_url=redis_url)
    second = await start_gateway(planes=("proxy",), redis_url=redis_url)
    created = await first.create_token()
    rotated = await rotate(first, created["id"])
    for gateway in (first, second):
        assert await proxy_verdict(gateway, created["token"]) == OK
        await gateway.core.usage.flush()
    assert (await shown(first, created["id"]))["previous_secret"]["uses"] == 2

    status, ended = await first.admin_call("POST", f"/v1/tokens/{created['id']}/end-grace")

    assert status == 200, ended
    assert ended["previous_secret_expires_at"] is None and ended["version"] == rotated["version"] + 1
    assert ended["updated_at"] > rotated["updated_at"]
    stored = await first.core.store.get_token(created["id"])
    assert stored is not None and stored.previous_secret_hash is None  # the old secret's hash is gone
    assert await proxy_verdict(first, created["token"]) == INVALID  # right after: written through

    async def refused_by_the_other_proxy() -> bool:
        return await proxy_verdict(second, created["token"]) == INVALID

    await eventually(refused_by_the_other_proxy)  # the change travels through Redis
    for gateway in (first, second):
        assert await proxy_verdict(gateway, rotated["token"]) == OK
    assert "previous_secret" not in await shown(first, created["id"])
    events = [event for event in await audit_events(first, created["id"]) if event["action"] == "token.end_grace"]
    assert [event["details"] for event in events] == [
        {"previous_secret_expires_at": rotated["previous_secret_expires_at"]}
    ]
    # Nothing in Redis holds a secret: ids, times, addresses and counts only.
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter("gateway:usage:previous:*")]
        assert len(keys) == 1 and 0 < await client.ttl(keys[0]) <= 8 * 86400
        values = repr(await client.hgetall(keys[0]))
    finally:
        await client.aclose()
    for token in (created["token"], rotated["token"]):
        secret = token.split("_", 2)[2]
        assert secret not in repr(keys) + values


async def test_end_grace_without_a_grace_is_409_and_for_an_unknown_token_404(start_gateway: GatewayFactory) -> None:
    clock = SettableClock()
    gateway = await start_gateway(clock=clock)
    created = await gateway.create_token()
    refused = await expect_problem(
        await admin_request(gateway, "POST", f"/v1/tokens/{created['id']}/end-grace"), 409, "no_grace"
    )
    assert refused["detail"] == "The token has no grace period running: only its current secret is accepted."
    await rotate(gateway, created["id"], grace_seconds=60)
    clock.advance(60)  # ended by itself
    await expect_problem(await admin_request(gateway, "POST", f"/v1/tokens/{created['id']}/end-grace"), 409, "no_grace")
    await expect_problem(
        await admin_request(gateway, "POST", "/v1/tokens/AAAAAAAAAAAAAAAAAAAAAA/end-grace"), 404, "token_not_found"
    )
    await expect_problem(
        await admin_request(gateway, "POST", f"/v1/tokens/{created['id']}/end-grace", json={"now": True}),
        400,
        "unknown_field",
    )
    assert [event["action"] for event in await audit_events(gateway, created["id"])] == [
        "token.rotate", "token.create"
    ]
