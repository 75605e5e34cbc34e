"""A token's rate limit and quota as an integration sees them: 429s with their codes, Retry-After and the
RateLimit fields, counted only once the request is otherwise allowed. Each test runs twice: counted in the
process (no Redis), and in a real Redis by the Lua script; both must give the same numbers.

The gateway's clock is a SettableClock: a window refills and a UTC day or month begins when the test says so,
so every number in the headers is exact.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tests.conftest import GatewayFactory, SettableClock, StartForwardAuth

START = datetime(2031, 5, 6, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(params=["process", "redis"])
def counted(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Where limits are counted: the settings that choose it."""
    return {"redis_url": request.getfixturevalue("redis_url")} if request.param == "redis" else {}


async def _call(
    gateway: Any, token: str, path: str = "/api/posts", method: str = "GET"
) -> tuple[int, str, Any]:
    response = await gateway.call(token, path, method)
    body = await response.json(content_type=None)
    return response.status, body.get("code", "") if response.status >= 400 else "", response.headers


async def test_rate_limit_admits_the_burst_then_one_per_interval_with_exact_headers(
    start_gateway: GatewayFactory, counted: dict[str, Any]
) -> None:
    clock = SettableClock(START)
    gateway = await start_gateway(clock=clock, **counted)
    created = await gateway.create_token(rate_limit={"requests": 3, "per_seconds": 60})
    token = created["token"]

    answers = [await _call(gateway, token) for _ in range(4)]

    assert [(status, code) for status, code, _ in answers] == [
        (200, ""),
        (200, ""),
        (200, ""),
        (429, "rate_limited"),
    ]
    assert [headers["RateLimit"] for _, _, headers in answers] == [
        '"rate";r=2;t=20',
        '"rate";r=1;t=40',
        '"rate";r=0;t=60',
        '"rate";r=0;t=60',
    ]
    assert {headers["RateLimit-Policy"] for _, _, headers in answers} == {'"rate";q=3;w=60'}
    refused = answers[3][2]
    assert refused["Retry-After"] == "20"
    assert refused["Content-Type"] == "application/problem+json"

    clock.advance(19.9)
    assert (await _call(gateway, token))[:2] == (429, "rate_limited")
    clock.advance(0.1)
    status, _, headers = await _call(gateway, token)
    assert (status, headers["RateLimit"]) == (200, '"rate";r=0;t=60')
    assert (await _call(gateway, token))[:2] == (429, "rate_limited")
    clock.advance(60)
    assert [(await _call(gateway, token))[0] for _ in range(4)] == [200, 200, 200, 429]


async def test_burst_caps_requests_back_to_back_below_the_window(
    start_gateway: GatewayFactory, counted: dict[str, Any]
) -> None:
    clock = SettableClock(START)
    gateway = await start_gateway(clock=clock, **counted)
    token = (await gateway.create_token(rate_limit={"requests": 10, "per_seconds": 10, "burst": 2}))["token"]

    assert [(await _call(gateway, token))[0] for _ in range(3)] == [200, 200, 429]
    clock.advance(1)
    assert [(await _call(gateway, token))[0] for _ in range(2)] == [200, 429]


async def test_day_quota_refuses_until_utc_midnight_then_refills(
    start_gateway: GatewayFactory, counted: dict[str, Any]
) -> None:
    clock = SettableClock(datetime(2031, 5, 6, 23, 59, 58, tzinfo=UTC))
    gateway = await start_gateway(clock=clock, **counted)
    token = (await gateway.create_token(quota={"requests": 2, "period": "day"}))["token"]

    answers = [await _call(gateway, token) for _ in range(3)]

    assert [(status, code) for status, code, _ in answers] == [(200, ""), (200, ""), (429, "quota_exceeded")]
    assert [headers["RateLimit"] for _, _, headers in answers] == [
        '"quota";r=1;t=2',
        '"quota";r=0;t=2',
        '"quota";r=0;t=2',
    ]
    assert answers[2][2]["RateLimit-Policy"] == '"quota";q=2;w=86400'
    assert answers[2][2]["Retry-After"] == "2"
    clock.advance(1.999)
    assert (await _call(gateway, token))[:2] == (429, "quota_exceeded")
    clock.advance(0.001)  # 2031-05-07T00:00:00Z
    status, _, headers = await _call(gateway, token)
    assert (status, headers["RateLimit"]) == (200, '"quota";r=1;t=86400')


async def test_month_quota_follows_the_calendar_month_in_utc(
    start_gateway: GatewayFactory, counted: dict[str, Any]
) -> None:
    clock = SettableClock(datetime(2031, 12, 31, 23, 59, 59, tzinfo=UTC))
    gateway = await start_gateway(clock=clock, **counted)
    token = (await gateway.create_token(quota={"requests": 1, "period": "month"}))["token"]

    status, _, headers = await _call(gateway, token)
    assert (status, headers["RateLimit-Policy"], headers["RateLimit"]) == (
        200,
        f'"quota";q=1;w={31 * 86400}',
        '"quota";r=0;t=1',
    )
    assert (await _call(gateway, token))[:2] == (429, "quota_exceeded")
    clock.advance(1)  # January 2032
    assert (await _call(gateway, token))[:2] == (200, "")
    assert (await _call(gateway, token))[:2] == (429, "quota_exceeded")
    clock.advance(31 * 86400 - 1)  # 2032-01-31T23:59:59Z: still January
    assert (await _call(gateway, token))[:2] == (429, "quota_exceeded")
    clock.advance(1)
    _, _, headers = await _call(gateway, token)
    assert headers["RateLimit-Policy"] == f'"quota";q=1;w={29 * 86400}'  # February of a leap year


async def test_total_quota_never_refills_and_says_so_without_retry_after(
    start_gateway: GatewayFactory, counted: dict[str, Any]
) -> None:
    clock = SettableClock(START)
    gateway = await start_gateway(clock=clock, **counted)
    token = (await gateway.create_token(quota={"requests": 2, "period": "total"}))["token"]

    assert [(await _call(gateway, token))[2]["RateLimit"] for _ in range(2)] == ['"quota";r=1', '"quota";r=0']
    clock.advance(400 * 86400)
    status, code, headers = await _call(gateway, token)
    assert (status, code, headers["RateLimit-Policy"]) == (429, "quota_exceeded", '"quota";q=2')
    assert "Retry-After" not in headers


async def test_a_spent_quota_is_named_before_the_rate_and_refusals_consume_nothing(
    start_gateway: GatewayFactory, counted: dict[str, Any]
) -> None:
    clock = SettableClock(START)
    gateway = await start_gateway(clock=clock, **counted)
    token = (
        await gateway.create_token(
            rate_limit={"requests": 2, "per_seconds": 10}, quota={"requests": 3, "period": "day"}
        )
    )["token"]

    assert [(await _call(gateway, token))[:2] for _ in range(3)] == [
        (200, ""),
        (200, ""),
        (429, "rate_limited"),
    ]
    clock.advance(5)
    status, _, headers = await _call(gateway, token)  # the rate refusal did not count against the quota
    assert (status, headers["RateLimit"]) == (200, '"rate";r=0;t=10, "quota";r=0;t=43195')
    clock.advance(10)
    status, code, headers = await _call(gateway, token)
    assert (status, code) == (429, "quota_exceeded")
    assert headers["RateLimit"] == '"rate";r=2;t=0, "quota";r=0;t=43185'
    assert headers["RateLimit-Policy"] == '"rate";q=2;w=10, "quota";q=3;w=86400'


async def test_wrong_secrets_and_refused_requests_do_not_use_the_budget(
    start_gateway: GatewayFactory, counted: dict[str, Any]
) -> None:
    gateway = await start_gateway(clock=SettableClock(START), **counted)
    created = await gateway.create_token(access_level="read_only", quota={"requests": 1, "period": "total"})
    wrong = created["token"][:-4] + ("aaaa" if not created["token"].endswith("aaaa") else "bbbb")

    assert (await _call(gateway, wrong))[:2] == (401, "invalid_token")
    assert (await _call(gateway, created["token"], method="DELETE"))[:2] == (403, "insufficient_access_level")
    assert (await _call(gateway, created["token"]))[:2] == (200, "")
    assert (await _call(gateway, created["token"]))[:2] == (429, "quota_exceeded")


async def test_a_token_without_limits_gets_no_ratelimit_fields(
    start_gateway: GatewayFactory, counted: dict[str, Any]
) -> None:
    gateway = await start_gateway(**counted)
    token = (await gateway.create_token())["token"]

    status, _, headers = await _call(gateway, token)

    assert status == 200 and "RateLimit" not in headers and "RateLimit-Policy" not in headers


async def test_patch_of_a_limit_holds_on_the_next_request(
    start_gateway: GatewayFactory, counted: dict[str, Any]
) -> None:
    gateway = await start_gateway(clock=SettableClock(START), **counted)
    created = await gateway.create_token(quota={"requests": 1, "period": "day"})
    assert [(await _call(gateway, created["token"]))[0] for _ in range(2)] == [200, 429]

    status, _ = await gateway.admin_call(
        "PATCH", f"/v1/tokens/{created['id']}", json={"quota": {"requests": 3, "period": "day"}}
    )
    assert status == 200
    assert [(await _call(gateway, created["token"]))[0] for _ in range(3)] == [200, 200, 429]
    await gateway.admin_call("PATCH", f"/v1/tokens/{created['id']}", json={"quota": None})
    status, _, headers = await _call(gateway, created["token"])
    assert status == 200 and "RateLimit" not in headers


async def test_forward_auth_enforces_the_same_limits(
    start_forward_auth: StartForwardAuth, counted: dict[str, Any]
) -> None:
    forward_auth = await start_forward_auth(clock=SettableClock(START), **counted)
    created = await forward_auth.gateway.create_token(rate_limit={"requests": 2, "per_seconds": 60})

    answers = [await forward_auth.nginx(created["token"], "GET", "/api/posts") for _ in range(3)]

    assert [response.status for response in answers] == [200, 200, 429]
    assert answers[0].headers["RateLimit"] == '"rate";r=1;t=30'
    assert answers[2].headers["Retry-After"] == "30"
    assert answers[2].headers["RateLimit-Policy"] == '"rate";q=2;w=60'
    token = created["token"]
    wrong = await forward_auth.nginx(
        token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb"), "GET", "/api"
    )
    assert wrong.status == 401
