"""Disable, enable, delete, expiry and usage: what the admin API shows and what the proxy then answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.admin_api.conftest import (
    TIMESTAMP,
    admin_request,
    audit_actions,
    eventually,
    expect_problem,
    proxy_verdict,
    rfc3339,
    token_view,
)
from tests.conftest import Gateway, both_store_backends

pytestmark = both_store_backends

UNKNOWN_ID = "0000000000000000"


# --- disable and enable ------------------------------------------------------------------------------------


async def test_disable_makes_the_proxy_answer_token_disabled(gateway: Gateway) -> None:
    created = await gateway.create_token()
    assert await proxy_verdict(gateway, created["token"]) == (200, "")

    status, disabled = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/disable")

    assert status == 200
    assert disabled["status"] == "disabled"
    assert await proxy_verdict(gateway, created["token"]) == (401, "token_disabled")


async def test_disabled_token_with_a_wrong_secret_is_still_invalid_token(gateway: Gateway) -> None:
    created = await gateway.create_token()
    status, rotated = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/rotate")
    assert status == 200
    await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/disable")

    # The replaced secret is well-formed and carries the right id, but it is no longer this token's secret.
    assert await proxy_verdict(gateway, created["token"]) == (401, "invalid_token")
    assert await proxy_verdict(gateway, rotated["token"]) == (401, "token_disabled")


async def test_enable_makes_a_disabled_token_work_again(gateway: Gateway) -> None:
    created = await gateway.create_token()
    await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    assert await proxy_verdict(gateway, created["token"]) == (401, "token_disabled")

    status, enabled = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/enable")

    assert status == 200
    assert enabled["status"] == "enabled"
    assert await proxy_verdict(gateway, created["token"]) == (200, "")


async def test_disable_twice_is_one_change(gateway: Gateway) -> None:
    created = await gateway.create_token()

    first_status, first = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    second_status, second = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/disable")

    assert (first_status, second_status) == (200, 200)
    assert second == first
    assert await audit_actions(gateway, created["id"]) == ["token.disable", "token.create"]


@pytest.mark.parametrize("action", ["disable", "enable", "rotate"])
async def test_each_status_change_and_rotation_is_a_new_version_an_old_edit_cannot_overwrite(
    gateway: Gateway, action: str
) -> None:
    created = await gateway.create_token()
    if action == "enable":
        await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    status, read = await gateway.admin_call("GET", f"/v1/tokens/{created['id']}")
    assert status == 200

    status, changed = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/{action}")
    assert status == 200 and changed["version"] == read["version"] + 1
    status, body = await gateway.admin_call(
        "PATCH", f"/v1/tokens/{created['id']}", json={"name": "stale edit", "version": read["version"]}
    )
    assert status == 409 and body["code"] == "conflict"
    assert body["detail"] == (
        f"The token is at version {changed['version']}, not {read['version']}: it changed since you read it."
        " Read it again and reapply your edit."
    )


async def test_enable_of_an_enabled_token_is_no_change(gateway: Gateway) -> None:
    created = await gateway.create_token()
    before = await token_view(gateway, created["id"])

    status, enabled = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/enable")

    assert (status, enabled) == (200, before)
    assert await audit_actions(gateway, created["id"]) == ["token.create"]
    assert await proxy_verdict(gateway, created["token"]) == (200, "")


@pytest.mark.parametrize("action", ["disable", "enable"])
async def test_status_change_of_an_unknown_token_is_404(gateway: Gateway, action: str) -> None:
    response = await admin_request(gateway, "POST", f"/v1/tokens/{UNKNOWN_ID}/{action}")

    await expect_problem(response, 404, "token_not_found")


# --- delete ------------------------------------------------------------------------------------------------


async def test_delete_answers_204_without_a_body(gateway: Gateway) -> None:
    created = await gateway.create_token()

    response = await admin_request(gateway, "DELETE", f"/v1/tokens/{created['id']}")

    assert response.status == 204
    assert await response.read() == b""


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("PATCH", "", {"name": "Renamed"}),
        ("POST", "/rotate", None),
        ("POST", "/disable", None),
        ("POST", "/enable", None),
        ("DELETE", "", None),
    ],
)
async def test_deleted_token_is_404_for_every_admin_action(
    gateway: Gateway, method: str, suffix: str, body: dict[str, Any] | None
) -> None:
    created = await gateway.create_token()
    await gateway.admin_call("DELETE", f"/v1/tokens/{created['id']}")

    response = await admin_request(gateway, method, f"/v1/tokens/{created['id']}{suffix}", json=body)

    problem = await expect_problem(response, 404, "token_not_found")
    assert problem["detail"] == f"There is no token with id '{created['id']}'."


async def test_deleted_token_is_invalid_token_at_the_proxy(gateway: Gateway) -> None:
    created = await gateway.create_token()
    assert await proxy_verdict(gateway, created["token"]) == (200, "")

    await gateway.admin_call("DELETE", f"/v1/tokens/{created['id']}")

    assert await proxy_verdict(gateway, created["token"]) == (401, "invalid_token")


async def test_deleted_token_leaves_the_list(gateway: Gateway) -> None:
    kept = await gateway.create_token()
    deleted = await gateway.create_token()

    await gateway.admin_call("DELETE", f"/v1/tokens/{deleted['id']}")

    status, listed = await gateway.admin_call("GET", "/v1/tokens")
    assert status == 200
    assert [item["id"] for item in listed["items"]] == [kept["id"]]


# --- expiry and usage --------------------------------------------------------------------------------------


async def test_token_is_refused_as_expired_once_expires_at_passes(gateway: Gateway) -> None:
    expires_at = datetime.now(UTC) + timedelta(seconds=2)
    created = await gateway.create_token(expires_at=rfc3339(expires_at))

    async def refusal() -> tuple[int, str] | None:
        verdict = await proxy_verdict(gateway, created["token"])
        return None if verdict == (200, "") else verdict

    assert await eventually(refusal, attempts=100, pause=0.1) == (401, "token_expired")


async def test_proxied_call_shows_last_used_time_and_address(gateway: Gateway) -> None:
    created = await gateway.create_token()
    assert await proxy_verdict(gateway, created["token"]) == (200, "")

    async def used() -> dict[str, Any] | None:
        view = await token_view(gateway, created["id"])
        return view if view["last_used_at"] is not None else None

    view = await eventually(used)
    assert TIMESTAMP.fullmatch(view["last_used_at"])
    assert view["last_used_at"] >= created["created_at"]
    assert view["last_used_ip"] == "127.0.0.1"
