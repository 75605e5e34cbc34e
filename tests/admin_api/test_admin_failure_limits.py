"""Wrong admin keys: limited per address with 429 + Retry-After, and a flood cannot grow the audit log."""

from __future__ import annotations

import asyncio
import logging

import pytest

from admin_api.auth_audit import FailedAuthAudit
from tests.admin_api.conftest import audit_events, expect_problem
from tests.conftest import ADMIN_KEY, Gateway, GatewayFactory

WRONG = "wrong-admin-key-Zq8vX1tK9mP2"


async def _as(gateway: Gateway, key: str, path: str = "/v1/tokens") -> tuple[int, dict[str, str]]:
    response = await gateway.admin.get(path, headers={"Authorization": f"Bearer {key}"})
    await response.read()
    return response.status, dict(response.headers)


async def _failed_auth_rows(gateway: Gateway) -> list[str]:
    return [event["action"] for event in await audit_events(gateway) if event["action"].startswith("admin_auth.")]


async def test_repeated_wrong_admin_keys_end_in_429_with_retry_after(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(failure_limit_per_source=3)
    statuses = [(await _as(gateway, f"{WRONG}-{n % 2}"))[0] for n in range(6)]
    assert statuses == [401] * 3 + [429] * 3

    response = await gateway.admin.get("/v1/tokens", headers={"Authorization": f"Bearer {WRONG}"})
    body = await expect_problem(response, 429, "too_many_failures")
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert WRONG not in body["detail"]


async def _new_key(gateway: Gateway) -> str:
    status, created = await gateway.admin_call("POST", "/v1/admin-keys", json={"name": "ops", "role": "viewer"})
    assert status == 201, created
    return str(created["key"])


async def test_an_admin_key_verified_before_is_accepted_from_a_throttled_address(
    start_gateway: GatewayFactory,
) -> None:
    gateway = await start_gateway(failure_limit_per_source=3)
    used = await _new_key(gateway)
    assert (await _as(gateway, used))[0] == 200
    for _ in range(5):
        await _as(gateway, WRONG)
    assert (await _as(gateway, WRONG))[0] == 429
    verifications = gateway.core.hasher.verify_calls

    for key in (used, ADMIN_KEY):  # the configured bootstrap key was verified at start
        statuses = [status for status, _ in await asyncio.gather(*(_as(gateway, key) for _ in range(5)))]
        assert statuses == [200] * 5
    assert gateway.core.hasher.verify_calls == verifications


async def test_a_key_not_yet_verified_waits_out_the_window_of_a_throttled_address(
    start_gateway: GatewayFactory,
) -> None:
    gateway = await start_gateway(failure_limit_per_source=3)
    unused = await _new_key(gateway)
    for _ in range(3):
        await _as(gateway, WRONG)

    status, headers = await _as(gateway, unused)
    assert status == 429 and int(headers["Retry-After"]) >= 1


async def test_a_throttled_address_costs_no_argon2(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(failure_limit_per_source=2)
    for n in range(2):
        assert (await _as(gateway, f"{WRONG}-{n}"))[0] == 401
    verifications = gateway.core.hasher.verify_calls

    for n in range(10):
        assert (await _as(gateway, f"{WRONG}-more-{n}"))[0] == 429

    assert gateway.core.hasher.verify_calls == verifications


async def test_missing_credentials_do_not_count_as_wrong_keys(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(failure_limit_per_source=2)
    for _ in range(5):
        assert (await gateway.admin.get("/v1/tokens")).status == 401
    assert (await _as(gateway, ADMIN_KEY))[0] == 200


async def test_a_flood_of_wrong_keys_writes_a_bounded_number_of_audit_rows(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(failure_limit_per_source=3)
    statuses = [(await _as(gateway, f"{WRONG}-{n}"))[0] for n in range(40)]

    assert statuses == [401] * 3 + [429] * 37
    assert await _failed_auth_rows(gateway) == ["admin_auth.throttled"] + ["admin_auth.failure"] * 3
    throttled = (await audit_events(gateway))[0]
    assert throttled["actor"] == "anonymous"
    assert throttled["details"]["source_ip"] == "127.0.0.1"


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def _rows(audit: FailedAuthAudit, code: str, source: str) -> list[str]:
    return [event.action for event in audit.events(code, source, {"source_ip": source})]


def test_rows_from_all_addresses_stop_at_the_budget_with_one_marking_row(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    audit = FailedAuthAudit(window=60, rows_per_window=5, clock=clock)
    written = [row for n in range(50) for row in _rows(audit, "invalid_admin_key", f"198.51.100.{n}")]
    written += _rows(audit, "too_many_failures", "203.0.113.1")

    assert written == ["admin_auth.failure"] * 5 + ["admin_auth.failures_suppressed"]

    clock.now += 60
    with caplog.at_level(logging.WARNING, logger="admin_api.auth_audit"):
        assert _rows(audit, "invalid_admin_key", "198.51.100.1") == ["admin_auth.failure"]
    assert "46 failed authentications" in caplog.text


def test_a_throttled_address_gets_one_row_per_window() -> None:
    clock = Clock()
    audit = FailedAuthAudit(window=60, clock=clock)
    rows = [row for _ in range(20) for row in _rows(audit, "too_many_failures", "192.0.2.7")]
    rows += _rows(audit, "too_many_failures", "192.0.2.8")
    assert rows == ["admin_auth.throttled"] * 2

    clock.now += 59
    assert _rows(audit, "too_many_failures", "192.0.2.7") == []
    clock.now += 1
    assert _rows(audit, "too_many_failures", "192.0.2.7") == ["admin_auth.throttled"]
