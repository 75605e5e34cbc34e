"""Listing tokens (order, pages, filters) and reading the audit log of admin actions."""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import pytest

from gateway.tokens import parse_rfc3339
from tests.admin_api.conftest import (
    TIMESTAMP,
    admin_request,
    audit_events,
    eventually,
    expect_problem,
    proxy_verdict,
    token_view,
)
from tests.conftest import Gateway, both_store_backends

pytestmark = both_store_backends


async def list_ids(gateway: Gateway, **params: str) -> list[str]:
    status, listed = await gateway.admin_call("GET", "/v1/tokens", params=params)
    assert status == 200, listed
    return [item["id"] for item in listed["items"]]


async def all_pages(gateway: Gateway, path: str, **params: str) -> list[list[str]]:
    """The ids on each page, following `next_cursor` until there is none."""
    pages: list[list[str]] = []
    cursor: str | None = None
    for _ in range(50):
        status, page = await gateway.admin_call(
            "GET", path, params={**params, **({"cursor": cursor} if cursor else {})}
        )
        assert status == 200, page
        pages.append([str(item["id"]) for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError("the pages never end")


async def create_tokens(gateway: Gateway, count: int) -> list[str]:
    return [(await gateway.create_token(name=f"token {n}"))["id"] for n in range(count)]


async def wait_until_used(gateway: Gateway, token: dict[str, Any]) -> str:
    """Call the proxy with `token` and return the last_used_at the admin API then shows."""
    assert await proxy_verdict(gateway, token["token"]) == (200, "")

    async def last_used() -> str | None:
        return (await token_view(gateway, token["id"]))["last_used_at"]  # type: ignore[no-any-return]

    return await eventually(last_used)


def later(timestamp: str, seconds: float) -> str:
    return (parse_rfc3339(timestamp) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- listing -----------------------------------------------------------------------------------------------


async def test_list_is_empty_without_tokens(gateway: Gateway) -> None:
    status, listed = await gateway.admin_call("GET", "/v1/tokens")

    assert (status, listed) == (200, {"items": [], "next_cursor": None})


async def test_list_shows_newest_first(gateway: Gateway) -> None:
    ids = await create_tokens(gateway, 3)

    assert await list_ids(gateway) == ids[::-1]


async def test_list_pages_with_limit_and_next_cursor(gateway: Gateway) -> None:
    ids = await create_tokens(gateway, 5)

    pages = await all_pages(gateway, "/v1/tokens", limit="2")

    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[0:1]]


async def test_list_has_no_next_cursor_when_the_page_holds_everything(gateway: Gateway) -> None:
    await create_tokens(gateway, 2)

    status, listed = await gateway.admin_call("GET", "/v1/tokens", params={"limit": "2"})

    assert status == 200
    assert len(listed["items"]) == 2
    assert listed["next_cursor"] is None


async def test_list_filters_by_status(gateway: Gateway) -> None:
    first, second, third = await create_tokens(gateway, 3)
    await gateway.admin_call("POST", f"/v1/tokens/{second}/disable")

    assert await list_ids(gateway, status="disabled") == [second]
    assert await list_ids(gateway, status="enabled") == [third, first]


async def test_list_unused_since_shows_tokens_never_used_or_last_used_before(gateway: Gateway) -> None:
    used = await gateway.create_token(name="used")
    unused = await gateway.create_token(name="unused")
    last_used_at = await wait_until_used(gateway, used)

    assert await list_ids(gateway, unused_since=last_used_at) == [unused["id"]]
    assert await list_ids(gateway, unused_since=later(last_used_at, 1)) == [unused["id"], used["id"]]


async def test_list_unused_since_accepts_an_offset(gateway: Gateway) -> None:
    used = await gateway.create_token(name="used")
    last_used_at = await wait_until_used(gateway, used)
    moment = parse_rfc3339(last_used_at) + timedelta(hours=1)
    with_offset = moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "+01:00"

    assert await list_ids(gateway, unused_since=with_offset) == []


async def test_list_combines_status_and_unused_since(gateway: Gateway) -> None:
    used_then_disabled = await gateway.create_token(name="used, disabled")
    unused_disabled = await gateway.create_token(name="unused, disabled")
    unused_enabled = await gateway.create_token(name="unused, enabled")
    last_used_at = await wait_until_used(gateway, used_then_disabled)
    for token in (used_then_disabled, unused_disabled):
        await gateway.admin_call("POST", f"/v1/tokens/{token['id']}/disable")

    assert await list_ids(gateway, status="disabled", unused_since=last_used_at) == [unused_disabled["id"]]
    assert await list_ids(gateway, status="enabled", unused_since=last_used_at) == [unused_enabled["id"]]


async def test_list_pages_keep_the_filter(gateway: Gateway) -> None:
    ids = await create_tokens(gateway, 6)
    for token_id in ids[::2]:
        await gateway.admin_call("POST", f"/v1/tokens/{token_id}/disable")

    pages = await all_pages(gateway, "/v1/tokens", status="disabled", limit="2")

    assert pages == [[ids[4], ids[2]], [ids[0]]]


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


BAD_LIST_QUERIES = {
    "limit 0": ({"limit": "0"}, "limit", "invalid_parameter"),
    "limit 501": ({"limit": "501"}, "limit", "invalid_parameter"),
    "negative limit": ({"limit": "-1"}, "limit", "invalid_parameter"),
    "limit not a number": ({"limit": "ten"}, "limit", "invalid_parameter"),
    "empty limit": ({"limit": ""}, "limit", "invalid_parameter"),
    "limit in superscript digits": ({"limit": "²"}, "limit", "invalid_parameter"),
    "limit in Arabic-Indic digits": ({"limit": "٣"}, "limit", "invalid_parameter"),
    "unknown status": ({"status": "active"}, "status", "invalid_parameter"),
    "status of another case": ({"status": "Enabled"}, "status", "invalid_parameter"),
    "unused_since words": ({"unused_since": "yesterday"}, "unused_since", "invalid_parameter"),
    "unused_since date only": ({"unused_since": "2027-01-01"}, "unused_since", "invalid_parameter"),
    "unused_since without offset": (
        {"unused_since": "2027-01-01T00:00:00"},
        "unused_since",
        "invalid_parameter",
    ),
    "cursor not ours": ({"cursor": "not-a-cursor"}, "cursor", "invalid_parameter"),
    "empty cursor": ({"cursor": ""}, "cursor", "invalid_parameter"),
    "unknown parameter": ({"sort": "name"}, "sort", "unknown_parameter"),
    "repeated parameter": ([("limit", "1"), ("limit", "2")], "limit", "invalid_parameter"),
}


@pytest.mark.parametrize(("params", "field", "code"), BAD_LIST_QUERIES.values(), ids=BAD_LIST_QUERIES.keys())
async def test_list_rejects_a_bad_query(gateway: Gateway, params: Any, field: str, code: str) -> None:
    await gateway.create_token()

    response = await admin_request(gateway, "GET", "/v1/tokens", params=params)

    await expect_problem(response, 400, code, field)


@pytest.mark.parametrize("path", ["/v1/tokens", "/v1/audit"])
async def test_list_rejects_a_cursor_out_of_range(gateway: Gateway, path: str) -> None:
    response = await admin_request(gateway, "GET", path, params={"cursor": _cursor("s" + "9" * 30)})

    await expect_problem(response, 400, "invalid_parameter", "cursor")


async def test_list_rejects_unused_since_beyond_the_calendar(gateway: Gateway) -> None:
    response = await admin_request(
        gateway, "GET", "/v1/tokens", params={"unused_since": "9999-12-31T23:59:59-23:59"}
    )

    await expect_problem(response, 400, "invalid_parameter", "unused_since")


async def test_list_unused_since_before_year_1000_excludes_used_tokens(gateway: Gateway) -> None:
    used = await gateway.create_token(name="used")
    await wait_until_used(gateway, used)

    assert await list_ids(gateway, unused_since="0999-01-01T00:00:00Z") == []


# --- audit -------------------------------------------------------------------------------------------------


async def test_every_action_is_audited_with_time_actor_and_token(gateway: Gateway) -> None:
    created = await gateway.create_token()
    token_id = created["id"]
    await gateway.admin_call("PATCH", f"/v1/tokens/{token_id}", json={"name": "Renamed"})
    await gateway.admin_call("POST", f"/v1/tokens/{token_id}/rotate", json={"grace_seconds": 60})
    await gateway.admin_call("POST", f"/v1/tokens/{token_id}/disable")
    await gateway.admin_call("POST", f"/v1/tokens/{token_id}/enable")
    await gateway.admin_call("DELETE", f"/v1/tokens/{token_id}")

    events = await audit_events(gateway)

    assert [event["action"] for event in events] == [
        "token.delete",
        "token.enable",
        "token.disable",
        "token.rotate",
        "token.edit",
        "token.create",
    ]
    for event in events:
        assert event["actor"] == "bootstrap"
        assert event["token_id"] == token_id
        assert TIMESTAMP.fullmatch(event["at"])
    assert [event["at"] for event in events] == sorted((event["at"] for event in events), reverse=True)


async def test_audit_of_create_records_the_initial_settings(gateway: Gateway) -> None:
    created = await gateway.create_token(
        name="CRM",
        access_level="editorial",
        allowed_ip_ranges=["10.0.0.5/8"],
        expires_at="2099-01-01T00:00:00Z",
    )

    [event] = await audit_events(gateway, created["id"])

    assert event["details"] == {
        "name": "CRM",
        "access_level": "editorial",
        "allowed_ip_ranges": ["10.0.0.0/8"],
        "expires_at": "2099-01-01T00:00:00.000000Z",
        "rate_limit": None,
        "quota": None,
    }


async def test_audit_of_edit_records_only_changed_fields_from_and_to(gateway: Gateway) -> None:
    created = await gateway.create_token(
        name="CRM", access_level="editorial", expires_at="2099-01-01T00:00:00Z"
    )

    await gateway.admin_call(
        "PATCH",
        f"/v1/tokens/{created['id']}",
        json={
            "name": "Billing",
            "access_level": "editorial",
            "allowed_ip_ranges": ["10.1.2.3"],
            "expires_at": None,
        },
    )

    event = (await audit_events(gateway, created["id"]))[0]
    assert event["action"] == "token.edit"
    assert event["details"] == {
        "changes": {
            "name": {"from": "CRM", "to": "Billing"},
            "allowed_ip_ranges": {"from": [], "to": ["10.1.2.3/32"]},
            "expires_at": {"from": "2099-01-01T00:00:00.000000Z", "to": None},
        }
    }


@pytest.mark.parametrize("grace_seconds", [0, 3600])
async def test_audit_of_rotate_records_grace_seconds(gateway: Gateway, grace_seconds: int) -> None:
    created = await gateway.create_token()

    await gateway.admin_call(
        "POST", f"/v1/tokens/{created['id']}/rotate", json={"grace_seconds": grace_seconds}
    )

    event = (await audit_events(gateway, created["id"]))[0]
    assert (event["action"], event["details"]) == ("token.rotate", {"grace_seconds": grace_seconds})


async def test_audit_of_delete_records_the_name(gateway: Gateway) -> None:
    created = await gateway.create_token(name="CRM")

    await gateway.admin_call("DELETE", f"/v1/tokens/{created['id']}")

    event = (await audit_events(gateway, created["id"]))[0]
    assert (event["action"], event["details"]) == ("token.delete", {"name": "CRM"})


async def test_audit_filters_by_token_id(gateway: Gateway) -> None:
    first = await gateway.create_token()
    second = await gateway.create_token()
    await gateway.admin_call("POST", f"/v1/tokens/{first['id']}/disable")

    events = await audit_events(gateway, first["id"])

    assert [(event["action"], event["token_id"]) for event in events] == [
        ("token.disable", first["id"]),
        ("token.create", first["id"]),
    ]
    assert [event["token_id"] for event in await audit_events(gateway, second["id"])] == [second["id"]]
    assert await audit_events(gateway, "0000000000000000") == []


async def test_audit_pages_with_limit_and_next_cursor(gateway: Gateway) -> None:
    created = await gateway.create_token()
    for action in ("disable", "enable", "disable", "enable"):
        await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/{action}")
    everything = [str(event["id"]) for event in await audit_events(gateway)]

    pages = await all_pages(gateway, "/v1/audit", limit="2")

    assert pages == [everything[0:2], everything[2:4], everything[4:5]]


async def test_audit_pages_keep_the_token_filter(gateway: Gateway) -> None:
    first = await gateway.create_token()
    second = await gateway.create_token()
    for token in (first, second, first, second):
        await gateway.admin_call(
            "PATCH", f"/v1/tokens/{token['id']}", json={"name": f"renamed {token['id']}"}
        )
        await gateway.admin_call("PATCH", f"/v1/tokens/{token['id']}", json={"name": "again"})
    wanted = [str(event["id"]) for event in await audit_events(gateway, first["id"])]

    pages = await all_pages(gateway, "/v1/audit", token_id=first["id"], limit="2")

    assert len(wanted) == 5
    assert pages == [wanted[0:2], wanted[2:4], wanted[4:5]]


async def test_audit_never_shows_a_secret_or_a_hash(gateway: Gateway) -> None:
    created = await gateway.create_token()
    token_id = created["id"]
    await proxy_verdict(gateway, created["token"])
    status, rotated = await gateway.admin_call(
        "POST", f"/v1/tokens/{token_id}/rotate", json={"grace_seconds": 60}
    )
    assert status == 200
    await gateway.admin_call("PATCH", f"/v1/tokens/{token_id}", json={"name": "Renamed", "expires_at": None})
    await gateway.admin_call("POST", f"/v1/tokens/{token_id}/disable")
    await gateway.admin_call("DELETE", f"/v1/tokens/{token_id}")

    response = await admin_request(gateway, "GET", "/v1/audit")

    text = await response.text()
    assert response.status == 200
    assert "$argon2" not in text
    for token in (created["token"], rotated["token"]):
        assert token.rpartition("_")[2] not in text
    assert "test-admin-key" not in text


BAD_AUDIT_QUERIES = {
    "limit 0": ({"limit": "0"}, "limit", "invalid_parameter"),
    "limit not a number": ({"limit": "all"}, "limit", "invalid_parameter"),
    "cursor not ours": ({"cursor": "zzz"}, "cursor", "invalid_parameter"),
    "unknown parameter": ({"action": "token.create"}, "action", "unknown_parameter"),
}


@pytest.mark.parametrize(
    ("params", "field", "code"), BAD_AUDIT_QUERIES.values(), ids=BAD_AUDIT_QUERIES.keys()
)
async def test_audit_rejects_a_bad_query(
    gateway: Gateway, params: dict[str, str], field: str, code: str
) -> None:
    response = await admin_request(gateway, "GET", "/v1/audit", params=params)

    await expect_problem(response, 400, code, field)
