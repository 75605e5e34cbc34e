"""Bad admin input: a 400 problem naming the field, found before anything is written."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.admin_api.conftest import (
    admin_request,
    audit_actions,
    audit_events,
    expect_problem,
    proxy_verdict,
    token_view,
)
from tests.conftest import Gateway

VALID = {"name": "CRM sync", "access_level": "read_only"}
PAST = "2020-01-01T00:00:00Z"


def body_with(**fields: Any) -> bytes:
    return json.dumps({**VALID, **fields}).encode()


def body_without(field: str) -> bytes:
    return json.dumps({key: value for key, value in VALID.items() if key != field}).encode()


# (raw body, code, field): field None means the problem names no field.
BAD_CREATE_BODIES = {
    "malformed JSON": (b'{"name": "CRM", ', "invalid_json", None),
    "not UTF-8": (b'{"name": "\xff"}', "invalid_json", None),
    "a JSON array": (json.dumps([VALID]).encode(), "invalid_json", None),
    "a JSON string": (b'"CRM"', "invalid_json", None),
    "JSON null": (b"null", "invalid_json", None),
    "deeply nested JSON": (b"[" * 60000, "invalid_json", None),
    "empty body": (b"", "missing_field", "name"),
    "unknown field": (body_with(scopes=["read"]), "unknown_field", "scopes"),
    "status is not settable": (body_with(status="disabled"), "unknown_field", "status"),
    "missing name": (body_without("name"), "missing_field", "name"),
    "missing access_level": (body_without("access_level"), "missing_field", "access_level"),
    "empty name": (body_with(name=""), "invalid_name", "name"),
    "whitespace name": (body_with(name=" \t "), "invalid_name", "name"),
    "101-character name": (body_with(name="n" * 101), "invalid_name", "name"),
    "number name": (body_with(name=42), "invalid_name", "name"),
    "null name": (body_with(name=None), "invalid_name", "name"),
    "name with NUL": (body_with(name="CRM\x00sync"), "invalid_name", "name"),
    "name with newline": (body_with(name="CRM\nsync"), "invalid_name", "name"),
    "name with DEL": (body_with(name="CRM\x7fsync"), "invalid_name", "name"),
    "name with C1 control": (body_with(name="CRM\x9b31msync"), "invalid_name", "name"),
    "name with line separator": (body_with(name="CRM\u2028sync"), "invalid_name", "name"),
    "unknown access level": (body_with(access_level="superuser"), "unknown_access_level", "access_level"),
    "access level of another case": (
        body_with(access_level="READ_ONLY"),
        "unknown_access_level",
        "access_level",
    ),
    "number access level": (body_with(access_level=1), "unknown_access_level", "access_level"),
    "prefix over 32": (body_with(allowed_ip_ranges=["10.0.0.0/33"]), "invalid_ip_range", "allowed_ip_ranges"),
    "IPv6 prefix over 128": (
        body_with(allowed_ip_ranges=["::/129"]),
        "invalid_ip_range",
        "allowed_ip_ranges",
    ),
    "not an IP": (body_with(allowed_ip_ranges=["not-an-ip"]), "invalid_ip_range", "allowed_ip_ranges"),
    "short IPv4": (body_with(allowed_ip_ranges=["10.1"]), "invalid_ip_range", "allowed_ip_ranges"),
    "padded range": (body_with(allowed_ip_ranges=[" 10.0.0.0/8"]), "invalid_ip_range", "allowed_ip_ranges"),
    "number range": (body_with(allowed_ip_ranges=[10]), "invalid_ip_range", "allowed_ip_ranges"),
    "one good one bad range": (
        body_with(allowed_ip_ranges=["10.0.0.0/8", "10.0.0.0/x"]),
        "invalid_ip_range",
        "allowed_ip_ranges",
    ),
    "ranges as a string": (
        body_with(allowed_ip_ranges="10.0.0.0/8"),
        "invalid_ip_range",
        "allowed_ip_ranges",
    ),
    "ranges as null": (body_with(allowed_ip_ranges=None), "invalid_ip_range", "allowed_ip_ranges"),
    "101 ranges": (
        body_with(allowed_ip_ranges=[f"10.0.{n // 256}.{n % 256}" for n in range(101)]),
        "too_many_ip_ranges",
        "allowed_ip_ranges",
    ),
    "date without time": (body_with(expires_at="2099-01-01"), "invalid_expires_at", "expires_at"),
    "time without offset": (body_with(expires_at="2099-01-01T00:00:00"), "invalid_expires_at", "expires_at"),
    "words": (body_with(expires_at="tomorrow"), "invalid_expires_at", "expires_at"),
    "epoch number": (body_with(expires_at=4070908800), "invalid_expires_at", "expires_at"),
    "impossible date": (body_with(expires_at="2099-02-30T00:00:00Z"), "invalid_expires_at", "expires_at"),
    "expires in the past": (body_with(expires_at=PAST), "invalid_expires_at", "expires_at"),
}


@pytest.mark.parametrize(("body", "code", "field"), BAD_CREATE_BODIES.values(), ids=BAD_CREATE_BODIES.keys())
async def test_create_rejects_bad_input_and_writes_nothing(
    gateway: Gateway, body: bytes, code: str, field: str | None
) -> None:
    response = await admin_request(
        gateway, "POST", "/v1/tokens", data=body, headers={"Content-Type": "application/json"}
    )

    problem = await expect_problem(response, 400, code)
    assert problem.get("field") == field
    status, listed = await gateway.admin_call("GET", "/v1/tokens")
    assert (status, listed["items"]) == (200, [])
    assert await audit_events(gateway) == []


# An unsigned offset that puts the moment past year 9999 in UTC; likewise before year 1.
OUT_OF_RANGE_MOMENTS = ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00"]


@pytest.mark.parametrize("moment", OUT_OF_RANGE_MOMENTS)
async def test_create_rejects_expires_at_beyond_the_calendar(gateway: Gateway, moment: str) -> None:
    response = await admin_request(gateway, "POST", "/v1/tokens", json={**VALID, "expires_at": moment})

    await expect_problem(response, 400, "invalid_expires_at", "expires_at")


@pytest.mark.parametrize("prefix", ["²", "١"])
async def test_create_rejects_a_prefix_length_in_non_ascii_digits(gateway: Gateway, prefix: str) -> None:
    response = await admin_request(
        gateway, "POST", "/v1/tokens", json={**VALID, "allowed_ip_ranges": [f"10.0.0.0/{prefix}"]}
    )

    await expect_problem(response, 400, "invalid_ip_range", "allowed_ip_ranges")


async def test_body_over_the_size_limit_is_413_and_writes_nothing(gateway: Gateway) -> None:
    response = await admin_request(gateway, "POST", "/v1/tokens", json={**VALID, "name": "n" * (70 * 1024)})

    await expect_problem(response, 413, "request_too_large")
    status, listed = await gateway.admin_call("GET", "/v1/tokens")
    assert (status, listed["items"]) == (200, [])


BAD_EDIT_BODIES = {
    "malformed JSON": (b"{", "invalid_json", None),
    "a JSON array": (b'[{"name": "Renamed"}]', "invalid_json", None),
    "unknown field": (b'{"id": "0000000000000000"}', "unknown_field", "id"),
    "status is not editable here": (b'{"status": "disabled"}', "unknown_field", "status"),
    "empty name": (b'{"name": ""}', "invalid_name", "name"),
    "null name": (b'{"name": null}', "invalid_name", "name"),
    "null access level": (b'{"access_level": null}', "unknown_access_level", "access_level"),
    "unknown access level": (b'{"access_level": "root"}', "unknown_access_level", "access_level"),
    "bad range": (b'{"allowed_ip_ranges": ["10.0.0.0/33"]}', "invalid_ip_range", "allowed_ip_ranges"),
    "null ranges": (b'{"allowed_ip_ranges": null}', "invalid_ip_range", "allowed_ip_ranges"),
    "expires in the past": (b'{"expires_at": "2020-01-01T00:00:00Z"}', "invalid_expires_at", "expires_at"),
    "expires as a date": (b'{"expires_at": "2099-01-01"}', "invalid_expires_at", "expires_at"),
    "one good field, one bad": (
        b'{"name": "Renamed", "access_level": "root"}',
        "unknown_access_level",
        "access_level",
    ),
}


@pytest.mark.parametrize(("body", "code", "field"), BAD_EDIT_BODIES.values(), ids=BAD_EDIT_BODIES.keys())
async def test_patch_rejects_bad_input_and_changes_nothing(
    gateway: Gateway, body: bytes, code: str, field: str | None
) -> None:
    created = await gateway.create_token(allowed_ip_ranges=["127.0.0.1"], expires_at="2099-01-01T00:00:00Z")
    before = await token_view(gateway, created["id"])

    response = await admin_request(
        gateway,
        "PATCH",
        f"/v1/tokens/{created['id']}",
        data=body,
        headers={"Content-Type": "application/json"},
    )

    problem = await expect_problem(response, 400, code)
    assert problem.get("field") == field
    assert await token_view(gateway, created["id"]) == before
    assert await audit_actions(gateway, created["id"]) == ["token.create"]
    assert await proxy_verdict(gateway, created["token"]) == (200, "")


@pytest.mark.parametrize("action", ["disable", "enable"])
async def test_status_change_rejects_a_body_field(gateway: Gateway, action: str) -> None:
    created = await gateway.create_token()

    response = await admin_request(
        gateway, "POST", f"/v1/tokens/{created['id']}/{action}", json={"reason": "x"}
    )

    await expect_problem(response, 400, "unknown_field", "reason")
    assert await audit_actions(gateway, created["id"]) == ["token.create"]
