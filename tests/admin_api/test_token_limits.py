"""A token's rate_limit and quota through the admin API: set on create, changed by PATCH, shown, audited,
validated with a 400 naming the field, null for unlimited."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.admin_api.conftest import admin_request, audit_actions, audit_events, expect_problem, token_view
from tests.conftest import Gateway, both_store_backends

RATE = {"requests": 100, "per_seconds": 60, "burst": 20}
QUOTA = {"requests": 10_000, "period": "day"}


@both_store_backends
async def test_limits_are_set_on_create_and_shown_in_show_and_list(gateway: Gateway) -> None:
    created = await gateway.create_token(rate_limit=RATE, quota=QUOTA)
    assert (created["rate_limit"], created["quota"]) == (RATE, QUOTA)

    shown = await token_view(gateway, created["id"])
    assert (shown["rate_limit"], shown["quota"]) == (RATE, QUOTA)
    status, listed = await gateway.admin_call("GET", "/v1/tokens")
    assert status == 200
    [item] = [item for item in listed["items"] if item["id"] == created["id"]]
    assert (item["rate_limit"], item["quota"]) == (RATE, QUOTA)
    [event] = await audit_events(gateway, created["id"])
    assert (event["details"]["rate_limit"], event["details"]["quota"]) == (RATE, QUOTA)


async def test_a_token_without_limits_shows_null_and_burst_defaults_to_null(gateway: Gateway) -> None:
    plain = await gateway.create_token()
    assert (plain["rate_limit"], plain["quota"]) == (None, None)

    no_burst = await gateway.create_token(rate_limit={"requests": 5, "per_seconds": 1})
    assert no_burst["rate_limit"] == {"requests": 5, "per_seconds": 1, "burst": None}


@both_store_backends
async def test_patch_changes_and_clears_limits_and_audits_from_and_to(gateway: Gateway) -> None:
    created = await gateway.create_token(rate_limit=RATE)

    status, edited = await gateway.admin_call(
        "PATCH",
        f"/v1/tokens/{created['id']}",
        json={"rate_limit": {"requests": 7, "per_seconds": 2}, "quota": QUOTA},
    )
    assert status == 200, edited
    assert edited["rate_limit"] == {"requests": 7, "per_seconds": 2, "burst": None}
    assert edited["quota"] == QUOTA and edited["version"] == created["version"] + 1

    status, cleared = await gateway.admin_call(
        "PATCH", f"/v1/tokens/{created['id']}", json={"rate_limit": None, "quota": None}
    )
    assert status == 200 and (cleared["rate_limit"], cleared["quota"]) == (None, None)
    assert (await token_view(gateway, created["id"]))["rate_limit"] is None

    events = await audit_events(gateway, created["id"])
    assert [event["action"] for event in events] == ["token.edit", "token.edit", "token.create"]
    assert events[1]["details"]["changes"] == {
        "rate_limit": {"from": RATE, "to": {"requests": 7, "per_seconds": 2, "burst": None}},
        "quota": {"from": None, "to": QUOTA},
    }
    assert events[0]["details"]["changes"]["quota"] == {"from": QUOTA, "to": None}


async def test_patch_with_the_same_limits_changes_nothing(gateway: Gateway) -> None:
    created = await gateway.create_token(rate_limit=RATE, quota=QUOTA)

    status, same = await gateway.admin_call("PATCH", f"/v1/tokens/{created['id']}", json={"rate_limit": RATE})

    assert status == 200 and same["version"] == created["version"]
    assert await audit_actions(gateway, created["id"]) == ["token.create"]


# (field value, code, field named)
BAD_LIMITS: dict[str, tuple[str, Any, str, str]] = {
    "rate as a string": ("rate_limit", "100/60s", "invalid_rate_limit", "rate_limit"),
    "rate as a list": ("rate_limit", [100, 60], "invalid_rate_limit", "rate_limit"),
    "rate without requests": ("rate_limit", {"per_seconds": 60}, "invalid_rate_limit", "rate_limit.requests"),
    "rate without window": ("rate_limit", {"requests": 1}, "invalid_rate_limit", "rate_limit.per_seconds"),
    "rate of zero": (
        "rate_limit",
        {"requests": 0, "per_seconds": 60},
        "invalid_rate_limit",
        "rate_limit.requests",
    ),
    "negative rate": (
        "rate_limit",
        {"requests": -1, "per_seconds": 60},
        "invalid_rate_limit",
        "rate_limit.requests",
    ),
    "fractional rate": (
        "rate_limit",
        {"requests": 1.5, "per_seconds": 60},
        "invalid_rate_limit",
        "rate_limit.requests",
    ),
    "boolean rate": (
        "rate_limit",
        {"requests": True, "per_seconds": 60},
        "invalid_rate_limit",
        "rate_limit.requests",
    ),
    "rate as text": (
        "rate_limit",
        {"requests": "100", "per_seconds": 60},
        "invalid_rate_limit",
        "rate_limit.requests",
    ),
    "huge rate": (
        "rate_limit",
        {"requests": 10**9 + 1, "per_seconds": 366 * 86400},
        "invalid_rate_limit",
        "rate_limit.requests",
    ),
    "over 100000 a second": (
        "rate_limit",
        {"requests": 200_001, "per_seconds": 2},
        "invalid_rate_limit",
        "rate_limit.requests",
    ),
    "zero window": (
        "rate_limit",
        {"requests": 1, "per_seconds": 0},
        "invalid_rate_limit",
        "rate_limit.per_seconds",
    ),
    "window over a year": (
        "rate_limit",
        {"requests": 1, "per_seconds": 366 * 86400 + 1},
        "invalid_rate_limit",
        "rate_limit.per_seconds",
    ),
    "zero burst": (
        "rate_limit",
        {"requests": 1, "per_seconds": 1, "burst": 0},
        "invalid_rate_limit",
        "rate_limit.burst",
    ),
    "unknown rate field": (
        "rate_limit",
        {"requests": 1, "per_seconds": 1, "window": "1m"},
        "invalid_rate_limit",
        "rate_limit.window",
    ),
    "quota as a number": ("quota", 1000, "invalid_quota", "quota"),
    "quota without period": ("quota", {"requests": 1000}, "invalid_quota", "quota.period"),
    "quota without requests": ("quota", {"period": "day"}, "invalid_quota", "quota.requests"),
    "quota per week": ("quota", {"requests": 1000, "period": "week"}, "invalid_quota", "quota.period"),
    "quota period in capitals": (
        "quota",
        {"requests": 1000, "period": "DAY"},
        "invalid_quota",
        "quota.period",
    ),
    "zero quota": ("quota", {"requests": 0, "period": "day"}, "invalid_quota", "quota.requests"),
    "unknown quota field": (
        "quota",
        {"requests": 1, "period": "day", "reset": 0},
        "invalid_quota",
        "quota.reset",
    ),
}


@pytest.mark.parametrize(("name", "value", "code", "field"), BAD_LIMITS.values(), ids=BAD_LIMITS.keys())
async def test_bad_limits_are_a_400_naming_the_field_on_create_and_patch(
    gateway: Gateway, name: str, value: Any, code: str, field: str
) -> None:
    body = json.dumps({"name": "CRM", "access_level": "read_only", name: value}).encode()
    response = await admin_request(
        gateway, "POST", "/v1/tokens", data=body, headers={"Content-Type": "application/json"}
    )
    await expect_problem(response, 400, code, field)

    created = await gateway.create_token(rate_limit=RATE, quota=QUOTA)
    response = await admin_request(gateway, "PATCH", f"/v1/tokens/{created['id']}", json={name: value})
    await expect_problem(response, 400, code, field)
    shown = await token_view(gateway, created["id"])
    assert (shown["rate_limit"], shown["quota"]) == (RATE, QUOTA)
    assert await audit_actions(gateway, created["id"]) == ["token.create"]
