"""Grace and expiry, judged by the proxy against times the admin API stamped with a clock the test sets.

The admin plane's clock is set before the real time, so what it stamps as "in 60 seconds" is already past
for the proxy: grace ending and expiry are seen at once, without sleeping, through both public APIs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.admin_api.conftest import audit_events, expect_problem, proxy_verdict, rfc3339, token_view
from tests.conftest import GatewayFactory, SettableClock

OK = (200, "")
INVALID = (401, "invalid_token")
EXPIRED = (401, "token_expired")


def clock_before_now(seconds: float) -> SettableClock:
    return SettableClock(datetime.now(UTC) - timedelta(seconds=seconds))


async def test_rotate_stores_the_grace_in_seconds(start_gateway: GatewayFactory) -> None:
    clock = SettableClock(datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC))
    gateway = await start_gateway(clock=clock)
    created = await gateway.create_token()
    clock.advance(10)

    status, rotated = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/rotate", json={"grace_seconds": 90})

    assert status == 200, rotated
    assert rotated["rotated_at"] == "2031-05-06T07:08:19.123456Z"
    assert rotated["updated_at"] == "2031-05-06T07:08:19.123456Z"
    assert rotated["created_at"] == "2031-05-06T07:08:09.123456Z"
    assert rotated["previous_secret_expires_at"] == "2031-05-06T07:09:49.123456Z"
    assert (await token_view(gateway, created["id"]))["previous_secret_expires_at"] == "2031-05-06T07:09:49.123456Z"
    rotation = [event for event in await audit_events(gateway, created["id"]) if event["action"] == "token.rotate"]
    assert [(event["at"], event["details"]) for event in rotation] == [
        ("2031-05-06T07:08:19.123456Z", {"grace_seconds": 90})
    ]


@pytest.mark.parametrize(
    ("grace_seconds", "old_secret"),
    [(1, INVALID), (60, INVALID), (119, INVALID), (900, OK), (604800, OK)],
)
async def test_old_secret_works_exactly_while_the_grace_runs(
    start_gateway: GatewayFactory, grace_seconds: int, old_secret: tuple[int, str]
) -> None:
    """Rotated 120 s ago (by the admin clock): a grace under 120 s has ended, a longer one still runs."""
    clock = clock_before_now(120)
    gateway = await start_gateway(clock=clock)
    created = await gateway.create_token()

    status, rotated = await gateway.admin_call(
        "POST", f"/v1/tokens/{created['id']}/rotate", json={"grace_seconds": grace_seconds}
    )

    assert status == 200, rotated
    assert await proxy_verdict(gateway, created["token"]) == old_secret
    assert await proxy_verdict(gateway, rotated["token"]) == OK
    assert await proxy_verdict(gateway, created["token"]) == old_secret  # the memo answers as argon2 did


async def test_rotating_again_with_an_ended_grace_refuses_both_earlier_secrets(
    start_gateway: GatewayFactory,
) -> None:
    clock = clock_before_now(120)
    gateway = await start_gateway(clock=clock)
    created = await gateway.create_token()
    assert await proxy_verdict(gateway, created["token"]) == OK
    status, rotated = await gateway.admin_call(
        "POST", f"/v1/tokens/{created['id']}/rotate", json={"grace_seconds": 600}
    )
    assert status == 200, rotated
    assert await proxy_verdict(gateway, created["token"]) == OK

    clock.advance(-600)  # the second rotation's 60 s grace ended 660 s before the real time
    status, again = await gateway.admin_call(
        "POST", f"/v1/tokens/{created['id']}/rotate", json={"grace_seconds": 60}
    )

    assert status == 200, again
    assert await proxy_verdict(gateway, rotated["token"]) == INVALID
    assert await proxy_verdict(gateway, created["token"]) == INVALID
    assert await proxy_verdict(gateway, again["token"]) == OK


@pytest.mark.parametrize(
    ("expires_in", "verdict"), [(-119, EXPIRED), (-1, EXPIRED), (120 + 3600, OK)]
)
async def test_token_is_refused_as_expired_once_expires_at_passes(
    start_gateway: GatewayFactory, expires_in: int, verdict: tuple[int, str]
) -> None:
    """`expires_in` counts from the real time; the admin clock runs 120 s behind it."""
    clock = clock_before_now(120)
    gateway = await start_gateway(clock=clock)
    expires_at = clock.now + timedelta(seconds=120 + expires_in)

    created = await gateway.create_token(expires_at=rfc3339(expires_at))

    assert created["expires_at"] == rfc3339(expires_at)
    assert await proxy_verdict(gateway, created["token"]) == verdict
    assert await proxy_verdict(gateway, created["token"]) == verdict


async def test_editing_expires_at_into_the_past_of_the_proxy_expires_the_token(
    start_gateway: GatewayFactory,
) -> None:
    clock = clock_before_now(120)
    gateway = await start_gateway(clock=clock)
    created = await gateway.create_token()
    assert await proxy_verdict(gateway, created["token"]) == OK

    status, edited = await gateway.admin_call(
        "PATCH", f"/v1/tokens/{created['id']}", json={"expires_at": rfc3339(clock.now + timedelta(seconds=60))}
    )

    assert status == 200, edited
    assert edited["updated_at"] == rfc3339(clock.now)
    assert await proxy_verdict(gateway, created["token"]) == EXPIRED


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_expires_at_must_be_after_the_admin_clock(start_gateway: GatewayFactory, method: str) -> None:
    clock = SettableClock(datetime(2031, 1, 1, tzinfo=UTC))
    gateway = await start_gateway(clock=clock)
    created = await gateway.create_token()
    path = "/v1/tokens" if method == "POST" else f"/v1/tokens/{created['id']}"
    body = {"name": "n", "access_level": "editorial"} if method == "POST" else {}

    refused = await gateway.admin.request(
        method, path, json={**body, "expires_at": "2031-01-01T00:00:00Z"}, headers=gateway.admin_headers
    )
    await expect_problem(refused, 400, "invalid_expires_at", "expires_at")
    accepted = await gateway.admin.request(
        method, path, json={**body, "expires_at": "2031-01-01T00:00:00.000001Z"}, headers=gateway.admin_headers
    )

    assert accepted.status == (201 if method == "POST" else 200), await accepted.text()
    assert (await accepted.json())["expires_at"] == "2031-01-01T00:00:00.000001Z"


async def test_disable_and_enable_stamp_the_admin_clock(start_gateway: GatewayFactory) -> None:
    clock = SettableClock(datetime(2031, 1, 1, tzinfo=UTC))
    gateway = await start_gateway(clock=clock)
    created = await gateway.create_token()
    clock.advance(5)

    status, disabled = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    clock.advance(5)
    status_enabled, enabled = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/enable")

    assert (status, disabled["updated_at"]) == (200, "2031-01-01T00:00:05.000000Z")
    assert (status_enabled, enabled["updated_at"]) == (200, "2031-01-01T00:00:10.000000Z")
    events = await audit_events(gateway, created["id"])
    assert sorted((event["action"], event["at"]) for event in events) == [
        ("token.create", "2031-01-01T00:00:00.000000Z"),
        ("token.disable", "2031-01-01T00:00:05.000000Z"),
        ("token.enable", "2031-01-01T00:00:10.000000Z"),
    ]


async def test_an_edit_stamps_the_admin_clock(start_gateway: GatewayFactory) -> None:
    clock = SettableClock(datetime(2031, 1, 1, tzinfo=UTC))
    gateway = await start_gateway(clock=clock)
    created = await gateway.create_token()
    clock.advance(7)

    status, edited = await gateway.admin_call("PATCH", f"/v1/tokens/{created['id']}", json={"name": "renamed"})

    assert (status, edited["created_at"], edited["updated_at"]) == (
        200, "2031-01-01T00:00:00.000000Z", "2031-01-01T00:00:07.000000Z"
    )
