"""Requests per token by hour and by day, by outcome, counted by real proxies and read through the admin API.

Counts are flushed by each proxy's usage writer (flush() here, as its timer would); the bucket a request falls
in is set by the gateway's clock, which a test moves across an hour or a day instead of waiting.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as redis

from tests.admin_api.conftest import admin_request, expect_problem, proxy_verdict
from tests.conftest import Gateway, GatewayFactory, SettableClock, both_store_backends

OUTCOMES = ["allowed", "refused_level", "refused_ip", "rate_limited", "quota_exceeded"]


def totals(**counts: int) -> dict[str, int]:
    return {outcome: counts.get(outcome, 0) for outcome in OUTCOMES}


async def usage(gateway: Gateway, token_id: str, granularity: str = "hour") -> dict[str, Any]:
    status, answer = await gateway.admin_call("GET", f"/v1/tokens/{token_id}/usage?granularity={granularity}")
    assert status == 200, answer
    return dict(answer)


def nonzero(answer: dict[str, Any]) -> dict[str, dict[str, int]]:
    """The buckets with requests: start -> the counts that are not zero."""
    return {
        bucket["start"]: {outcome: bucket[outcome] for outcome in OUTCOMES if bucket[outcome]}
        for bucket in answer["buckets"]
        if any(bucket[outcome] for outcome in OUTCOMES)
    }


async def send_mixed_traffic(gateway: Gateway, reader: dict[str, Any], fenced: dict[str, Any], allowed: int) -> None:
    """`allowed` allowed calls and two refused by the level with `reader`; one refused by its IP range with
    `fenced`; and calls that are not the token's (a wrong secret, no token), which are not counted."""
    for _ in range(allowed):
        assert await proxy_verdict(gateway, reader["token"]) == (200, "")
    for _ in range(2):
        assert await proxy_verdict(gateway, reader["token"], method="DELETE") == (403, "insufficient_access_level")
    assert await proxy_verdict(gateway, fenced["token"]) == (403, "ip_not_allowed")
    wrong = reader["token"][:-6] + ("AAAAAA" if not reader["token"].endswith("AAAAAA") else "BBBBBB")
    assert (await proxy_verdict(gateway, wrong))[0] == 401


@both_store_backends
async def test_one_proxy_without_redis_counts_each_outcome_in_the_store(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway()
    reader = await gateway.create_token(access_level="read_only")
    fenced = await gateway.create_token(allowed_ip_ranges=["10.1.0.0/16"])

    await send_mixed_traffic(gateway, reader, fenced, allowed=3)
    await gateway.core.usage.flush()

    hourly = await usage(gateway, reader["id"])
    assert hourly["totals"] == totals(allowed=3, refused_level=2)
    assert list(nonzero(hourly).values()) == [{"allowed": 3, "refused_level": 2}]
    assert len(hourly["buckets"]) == 168 and hourly["bucket_seconds"] == 3600
    assert (await usage(gateway, fenced["id"]))["totals"] == totals(refused_ip=1)
    daily = await usage(gateway, reader["id"], "day")
    assert daily["totals"] == totals(allowed=3, refused_level=2)
    assert len(daily["buckets"]) == 90 and daily["bucket_seconds"] == 86400

    # Flushed again: the counts add up, they are not replaced.
    await send_mixed_traffic(gateway, reader, fenced, allowed=1)
    await gateway.core.usage.flush()
    assert (await usage(gateway, reader["id"]))["totals"] == totals(allowed=4, refused_level=4)
    assert (await usage(gateway, fenced["id"], "day"))["totals"] == totals(refused_ip=2)


async def test_two_proxies_with_redis_add_their_counts_up(start_gateway: GatewayFactory, redis_url: str) -> None:
    first = await start_gateway(redis_url=redis_url)
    second = await start_gateway(planes=("proxy",), redis_url=redis_url)
    reader = await first.create_token(access_level="read_only")
    fenced = await first.create_token(allowed_ip_ranges=["10.1.0.0/16"])

    await send_mixed_traffic(first, reader, fenced, allowed=2)
    await send_mixed_traffic(second, reader, fenced, allowed=5)
    await first.core.usage.flush()
    await second.core.usage.flush()

    assert (await usage(first, reader["id"]))["totals"] == totals(allowed=7, refused_level=4)
    assert (await usage(first, reader["id"], "day"))["totals"] == totals(allowed=7, refused_level=4)
    assert (await usage(first, fenced["id"]))["totals"] == totals(refused_ip=2)
    # Kept in Redis, not in the store; every hash expires.
    assert first.database is not None
    with sqlite3.connect(first.database) as connection:
        assert connection.execute("SELECT COUNT(*) FROM request_counts").fetchone() == (0,)
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [key.decode() async for key in client.scan_iter("gateway:usage:*:*")]
        assert {key.split(":")[2] for key in keys} == {"hour", "day", "addresses"}
        for key in keys:
            ttl = await client.ttl(key)
            limit = {"hour": (8 + 1) * 86400, "day": (91 + 31) * 86400, "addresses": 91 * 86400}[key.split(":")[2]]
            assert 0 < ttl <= limit, (key, ttl)
    finally:
        await client.aclose()


@pytest.mark.parametrize("shared", ["store", "redis"])
@pytest.mark.parametrize(
    ("before", "granularity", "first_bucket", "second_bucket"),
    [
        (datetime(2026, 12, 1, 10, 59, 59, 900000, tzinfo=UTC), "hour", "2026-12-01T10:00:00Z", "2026-12-01T11:00:00Z"),
        (datetime(2026, 11, 30, 23, 59, 59, 900000, tzinfo=UTC), "day", "2026-11-30T00:00:00Z", "2026-12-01T00:00:00Z"),
    ],
)
async def test_requests_fall_in_the_bucket_of_their_moment(
    start_gateway: GatewayFactory,
    request: pytest.FixtureRequest,
    shared: str,
    before: datetime,
    granularity: str,
    first_bucket: str,
    second_bucket: str,
) -> None:
    """Two requests just before the boundary, three just after (by the gateway's clock), one flush."""
    clock = SettableClock(before)
    options = {"redis_url": request.getfixturevalue("redis_url")} if shared == "redis" else {}
    gateway = await start_gateway(clock=clock, **options)
    token = await gateway.create_token(access_level="read_only")
    for _ in range(2):
        assert await proxy_verdict(gateway, token["token"]) == (200, "")
    clock.advance(0.2)
    for _ in range(3):
        assert await proxy_verdict(gateway, token["token"]) == (200, "")
    await gateway.core.usage.flush()

    assert nonzero(await usage(gateway, token["id"], granularity)) == {
        first_bucket: {"allowed": 2},
        second_bucket: {"allowed": 3},
    }
    answer = await usage(gateway, token["id"], granularity)
    assert answer["buckets"][-1]["start"] == second_bucket  # the current bucket is the last one shown
    if granularity == "hour":  # both hours are in one day
        assert nonzero(await usage(gateway, token["id"], "day")) == {"2026-12-01T00:00:00Z": {"allowed": 5}}


@pytest.mark.parametrize("shared", ["store", "redis"])
async def test_the_list_shows_requests_of_the_last_24_hours(
    start_gateway: GatewayFactory, request: pytest.FixtureRequest, shared: str
) -> None:
    """A request 24 hours before the current hour is not among them; one 23 hours before is."""
    clock = SettableClock(datetime(2026, 12, 2, 12, 30, tzinfo=UTC))
    options = {"redis_url": request.getfixturevalue("redis_url")} if shared == "redis" else {}
    gateway = await start_gateway(clock=clock, **options)
    busy = await gateway.create_token(access_level="read_only")
    idle = await gateway.create_token()
    clock.advance(-24 * 3600)
    assert await proxy_verdict(gateway, busy["token"]) == (200, "")
    clock.advance(3600)
    assert await proxy_verdict(gateway, busy["token"]) == (200, "")
    clock.advance(23 * 3600)
    assert await proxy_verdict(gateway, busy["token"]) == (200, "")
    assert await proxy_verdict(gateway, busy["token"], method="DELETE") == (403, "insufficient_access_level")
    await gateway.core.usage.flush()

    status, listing = await gateway.admin_call("GET", "/v1/tokens")
    assert status == 200
    assert {item["id"]: item["requests_24h"] for item in listing["items"]} == {busy["id"]: 3, idle["id"]: 0}


async def test_hour_buckets_older_than_8_days_are_deleted_from_the_store(start_gateway: GatewayFactory) -> None:
    clock = SettableClock(datetime(2026, 12, 2, 12, 0, tzinfo=UTC))
    gateway = await start_gateway(clock=clock)
    token = await gateway.create_token()
    clock.advance(-9 * 86400)
    assert await proxy_verdict(gateway, token["token"]) == (200, "")
    await gateway.core.usage.flush()
    clock.advance(9 * 86400)
    assert await proxy_verdict(gateway, token["token"]) == (200, "")
    await gateway.core.usage.flush()

    assert gateway.database is not None
    with sqlite3.connect(gateway.database) as connection:
        rows = connection.execute("SELECT granularity, COUNT(*) FROM request_counts GROUP BY granularity").fetchall()
    assert dict(rows) == {"hour": 1, "day": 2}
    assert (await usage(gateway, token["id"], "day"))["totals"] == totals(allowed=2)
    assert (await usage(gateway, token["id"]))["totals"] == totals(allowed=1)


async def test_usage_refuses_a_bad_granularity_and_an_unknown_token(gateway: Gateway) -> None:
    token = await gateway.create_token()
    response = await admin_request(gateway, "GET", f"/v1/tokens/{token['id']}/usage?granularity=minute")
    await expect_problem(response, 400, "invalid_parameter", "granularity")
    response = await admin_request(gateway, "GET", f"/v1/tokens/{token['id']}/usage?bucket=hour")
    await expect_problem(response, 400, "unknown_parameter", "bucket")
    response = await admin_request(gateway, "GET", "/v1/tokens/AAAAAAAAAAAAAAAAAAAAAA/usage")
    await expect_problem(response, 404, "token_not_found")
    response = await admin_request(gateway, "GET", "/v1/tokens/no-such-id/usage?granularity=day")
    await expect_problem(response, 404, "token_not_found")
    assert (await usage(gateway, token["id"]))["granularity"] == "hour"  # the default


async def test_usage_answers_and_redis_hold_no_secret(start_gateway: GatewayFactory, redis_url: str) -> None:
    gateway = await start_gateway(redis_url=redis_url)
    token = await gateway.create_token(access_level="read_only")
    assert await proxy_verdict(gateway, token["token"]) == (200, "")
    await gateway.core.usage.flush()
    secret = token["token"].split("_", 2)[2]

    answers = [await usage(gateway, token["id"]), await usage(gateway, token["id"], "day")]
    answers.append((await gateway.admin_call("GET", "/v1/tokens"))[1])
    client = redis.Redis.from_url(redis_url)
    try:
        stored = [key async for key in client.scan_iter("*")]
        for key in list(stored):
            if (await client.type(key)) == b"hash":
                stored += [f"{k!r}{v!r}".encode() for k, v in (await client.hgetall(key)).items()]
    finally:
        await client.aclose()
    for text in [repr(answer) for answer in answers] + [repr(item) for item in stored]:
        assert token["token"] not in text and secret not in text
