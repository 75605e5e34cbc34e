"""Rotation: a new secret for the same token, the old one refused at once or after a grace period."""

from __future__ import annotations

from typing import Any

import pytest

from tests.admin_api.conftest import (
    admin_request,
    audit_actions,
    expect_problem,
    proxy_verdict,
    token_view,
)
from tests.conftest import Gateway, both_store_backends

pytestmark = both_store_backends

OK = (200, "")
INVALID = (401, "invalid_token")


async def rotate(gateway: Gateway, token_id: str, **body: Any) -> dict[str, Any]:
    status, rotated = await gateway.admin_call("POST", f"/v1/tokens/{token_id}/rotate", json=body or None)
    assert status == 200, rotated
    return dict(rotated)


async def test_rotate_keeps_id_name_level_and_ranges(gateway: Gateway) -> None:
    created = await gateway.create_token(
        name="CRM", access_level="editorial", allowed_ip_ranges=["127.0.0.0/8"]
    )

    rotated = await rotate(gateway, created["id"])

    assert rotated["id"] == created["id"]
    assert rotated["name"] == "CRM"
    assert rotated["access_level"] == "editorial"
    assert rotated["allowed_ip_ranges"] == ["127.0.0.0/8"]
    assert rotated["status"] == "enabled"
    assert rotated["rotated_at"] is not None
    assert rotated["token"] != created["token"]
    assert rotated["token"].split("_")[1] == created["id"]
    assert {key: value for key, value in rotated.items() if key != "token"} == await token_view(
        gateway, created["id"]
    )


async def test_rotate_response_must_not_be_cached(gateway: Gateway) -> None:
    created = await gateway.create_token()

    response = await admin_request(gateway, "POST", f"/v1/tokens/{created['id']}/rotate")

    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"


async def test_rotate_refuses_the_old_secret_at_once(gateway: Gateway) -> None:
    created = await gateway.create_token()
    assert await proxy_verdict(gateway, created["token"]) == OK

    rotated = await rotate(gateway, created["id"])

    assert await proxy_verdict(gateway, created["token"]) == INVALID
    assert await proxy_verdict(gateway, rotated["token"]) == OK
    assert rotated["previous_secret_expires_at"] is None
    await _keeps_no_previous_hash(gateway, created["id"])


async def _keeps_no_previous_hash(gateway: Gateway, token_id: str) -> None:
    """Without a grace the old secret's hash is dropped, not kept where a leaked database would hold it."""
    record = await gateway.core.store.get_token(token_id)
    assert record is not None and record.previous_secret_hash is None


async def test_rotate_with_zero_grace_refuses_the_old_secret_at_once(gateway: Gateway) -> None:
    created = await gateway.create_token()
    assert await proxy_verdict(gateway, created["token"]) == OK

    rotated = await rotate(gateway, created["id"], grace_seconds=0)

    assert await proxy_verdict(gateway, created["token"]) == INVALID
    assert await proxy_verdict(gateway, rotated["token"]) == OK
    await _keeps_no_previous_hash(gateway, created["id"])


async def test_rotate_with_grace_keeps_the_old_secret_working(gateway: Gateway) -> None:
    created = await gateway.create_token()
    assert await proxy_verdict(gateway, created["token"]) == OK

    rotated = await rotate(gateway, created["id"], grace_seconds=3600)

    assert rotated["previous_secret_expires_at"] is not None
    assert rotated["previous_secret_expires_at"] > rotated["rotated_at"]
    assert await proxy_verdict(gateway, created["token"]) == OK
    assert await proxy_verdict(gateway, rotated["token"]) == OK


async def test_rotate_with_grace_accepts_an_old_secret_never_seen_before(gateway: Gateway) -> None:
    created = await gateway.create_token()

    rotated = await rotate(gateway, created["id"], grace_seconds=3600)

    assert await proxy_verdict(gateway, created["token"]) == OK
    assert await proxy_verdict(gateway, rotated["token"]) == OK


async def test_second_rotation_ends_the_earlier_grace(gateway: Gateway) -> None:
    created = await gateway.create_token()
    second = await rotate(gateway, created["id"], grace_seconds=3600)
    assert await proxy_verdict(gateway, created["token"]) == OK

    third = await rotate(gateway, created["id"], grace_seconds=3600)

    assert await proxy_verdict(gateway, created["token"]) == INVALID
    assert await proxy_verdict(gateway, second["token"]) == OK
    assert await proxy_verdict(gateway, third["token"]) == OK


async def test_second_rotation_without_grace_refuses_every_earlier_secret(gateway: Gateway) -> None:
    created = await gateway.create_token()
    second = await rotate(gateway, created["id"], grace_seconds=3600)
    assert await proxy_verdict(gateway, second["token"]) == OK

    third = await rotate(gateway, created["id"])

    assert await proxy_verdict(gateway, created["token"]) == INVALID
    assert await proxy_verdict(gateway, second["token"]) == INVALID
    assert await proxy_verdict(gateway, third["token"]) == OK
    assert third["previous_secret_expires_at"] is None
    await _keeps_no_previous_hash(gateway, created["id"])


async def test_rotate_accepts_the_longest_grace(gateway: Gateway) -> None:
    created = await gateway.create_token()

    rotated = await rotate(gateway, created["id"], grace_seconds=604800)

    assert rotated["previous_secret_expires_at"] is not None


@pytest.mark.parametrize("body", [{}, {"grace_seconds": 0}])
async def test_rotate_without_grace_keeps_no_hash_of_the_old_secret(gateway: Gateway, body: dict[str, Any]) -> None:
    created = await gateway.create_token()
    await rotate(gateway, created["id"], grace_seconds=60)  # a grace running already ...
    rotated = await rotate(gateway, created["id"], **body)  # ... ends with a rotation without one

    stored = await gateway.core.store.get_token(created["id"])
    assert stored is not None
    assert (stored.previous_secret_hash, stored.previous_secret_expires_at) == (None, None)
    assert "previous_secret" not in rotated


async def test_rotate_of_an_unknown_token_is_404(gateway: Gateway) -> None:
    response = await admin_request(gateway, "POST", "/v1/tokens/0000000000000000/rotate")

    await expect_problem(response, 404, "token_not_found")


@pytest.mark.parametrize("grace_seconds", [604801, -1, 1.5, 60.0, "60", True, False, [60], {"seconds": 60}])
async def test_rotate_rejects_a_grace_outside_0_to_604800_whole_seconds(
    gateway: Gateway, grace_seconds: object
) -> None:
    created = await gateway.create_token()

    response = await admin_request(
        gateway, "POST", f"/v1/tokens/{created['id']}/rotate", json={"grace_seconds": grace_seconds}
    )

    await expect_problem(response, 400, "invalid_grace_seconds", "grace_seconds")
    assert await proxy_verdict(gateway, created["token"]) == OK
    assert (await token_view(gateway, created["id"]))["rotated_at"] is None
    assert await audit_actions(gateway, created["id"]) == ["token.create"]


async def test_rotate_rejects_an_unknown_field(gateway: Gateway) -> None:
    created = await gateway.create_token()

    response = await admin_request(gateway, "POST", f"/v1/tokens/{created['id']}/rotate", json={"grace": 60})

    await expect_problem(response, 400, "unknown_field", "grace")
    assert await proxy_verdict(gateway, created["token"]) == OK
