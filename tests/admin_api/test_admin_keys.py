"""Admin keys: created with a role and shown once, listed without secrets, deleted with immediate effect;
a `viewer` reads and changes nothing; every key action and every wrong key is in the audit log."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import ClientResponse

from admin_api.admin_auth import admin_key_prefix
from gateway.token_format import issue_token
from tests.admin_api.conftest import TIMESTAMP, admin_request, audit_events, expect_problem
from tests.conftest import ADMIN_KEY, Gateway, both_store_backends, send_raw

pytestmark = both_store_backends

KEY_VIEW = {"id", "name", "role", "created_at"}
ABSENT_ID = "0000000000000000"


async def create_key(gateway: Gateway, role: str, name: str = "CI pipeline") -> dict[str, Any]:
    status, body = await gateway.admin_call("POST", "/v1/admin-keys", json={"name": name, "role": role})
    assert status == 201, body
    return dict(body)


def forged(gateway: Gateway, key_id: str) -> str:
    """A well-formed key (valid checksum) for a real key id, with a secret of its own."""
    return str(issue_token(admin_key_prefix(gateway.core.settings.token_prefix), key_id))


async def key_ids(gateway: Gateway) -> list[str]:
    status, listed = await gateway.admin_call("GET", "/v1/admin-keys")
    assert status == 200, listed
    return [item["id"] for item in listed["items"]]


async def as_key(gateway: Gateway, key: str, method: str, path: str, **kwargs: Any) -> ClientResponse:
    response = await gateway.admin.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kwargs)
    await response.read()
    return response


# --- create, list, session ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "viewer"])
async def test_create_answers_201_with_the_key_shown_once(gateway: Gateway, role: str) -> None:
    response = await admin_request(
        gateway, "POST", "/v1/admin-keys", json={"name": " CI pipeline ", "role": role}
    )

    assert response.status == 201
    body = await response.json()
    assert set(body) == KEY_VIEW | {"key"}
    assert (body["name"], body["role"]) == ("CI pipeline", role)
    assert TIMESTAMP.fullmatch(body["created_at"])
    assert body["key"].startswith(f"{gateway.core.settings.token_prefix}adm_{body['id']}_")
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Location"] == f"/v1/admin-keys/{body['id']}"


@pytest.mark.parametrize("role", ["admin", "viewer"])
async def test_created_key_works_as_a_bearer_key_and_session_names_it(gateway: Gateway, role: str) -> None:
    created = await create_key(gateway, role)

    response = await as_key(gateway, created["key"], "GET", "/v1/session")

    assert response.status == 200
    assert await response.json() == {key: created[key] for key in KEY_VIEW}


async def test_session_of_the_bootstrap_key(gateway: Gateway) -> None:
    status, body = await gateway.admin_call("GET", "/v1/session")

    assert status == 200
    assert (body["id"], body["role"]) == ("bootstrap", "admin")
    assert set(body) == KEY_VIEW


async def test_list_never_shows_a_key_or_a_hash(gateway: Gateway) -> None:
    created = [await create_key(gateway, "admin"), await create_key(gateway, "viewer", "dashboard")]

    response = await admin_request(gateway, "GET", "/v1/admin-keys")

    assert response.status == 200
    text = await response.text()
    items = json.loads(text)["items"]
    assert {item["id"] for item in items} == {"bootstrap", *(key["id"] for key in created)}
    assert all(set(item) == KEY_VIEW for item in items)
    assert "argon2" not in text and ADMIN_KEY not in text
    assert not any(key["key"] in text or key["key"].rpartition("_")[2] in text for key in created)


# --- delete -------------------------------------------------------------------------------------------------


async def test_deleted_key_is_refused_at_once(gateway: Gateway) -> None:
    created = await create_key(gateway, "admin")
    assert (await as_key(gateway, created["key"], "GET", "/v1/tokens")).status == 200  # verified and memoized

    status, body = await gateway.admin_call("DELETE", f"/v1/admin-keys/{created['id']}")
    assert (status, body) == (204, None)

    await expect_problem(await as_key(gateway, created["key"], "GET", "/v1/tokens"), 401, "invalid_admin_key")
    assert await key_ids(gateway) == ["bootstrap"]


async def test_a_key_may_delete_itself_while_another_admin_key_remains(gateway: Gateway) -> None:
    created = await create_key(gateway, "admin")

    response = await as_key(gateway, created["key"], "DELETE", f"/v1/admin-keys/{created['id']}")

    assert response.status == 204
    await expect_problem(
        await as_key(gateway, created["key"], "GET", "/v1/session"), 401, "invalid_admin_key"
    )


async def test_deleting_the_last_admin_key_is_409(gateway: Gateway) -> None:
    created = await create_key(gateway, "admin")
    viewer = await create_key(gateway, "viewer")
    status, _ = await gateway.admin_call("DELETE", f"/v1/admin-keys/{created['id']}")
    assert status == 204

    response = await admin_request(gateway, "DELETE", "/v1/admin-keys/bootstrap")

    await expect_problem(response, 409, "last_admin_key")
    assert (await as_key(gateway, ADMIN_KEY, "GET", "/v1/session")).status == 200
    assert (await as_key(gateway, viewer["key"], "GET", "/v1/session")).status == 200


async def test_the_bootstrap_key_may_go_once_another_admin_key_exists(gateway: Gateway) -> None:
    created = await create_key(gateway, "admin")

    response = await as_key(gateway, created["key"], "DELETE", "/v1/admin-keys/bootstrap")

    assert response.status == 204
    await expect_problem(await as_key(gateway, ADMIN_KEY, "GET", "/v1/session"), 401, "invalid_admin_key")
    await expect_problem(
        await as_key(gateway, created["key"], "DELETE", f"/v1/admin-keys/{created['id']}"),
        409,
        "last_admin_key",
    )


@pytest.mark.parametrize("key_id", [ABSENT_ID, "nope", "bootstrap2", "%00"])
async def test_deleting_an_unknown_key_is_404(gateway: Gateway, key_id: str) -> None:
    response = await admin_request(gateway, "DELETE", f"/v1/admin-keys/{key_id}")

    await expect_problem(response, 404, "admin_key_not_found")


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"name": "CI", "role": "owner"}, "role", "invalid_role"),
        ({"name": "CI", "role": "Admin"}, "role", "invalid_role"),
        ({"name": "CI", "role": ["admin"]}, "role", "invalid_role"),
        ({"name": "CI", "role": None}, "role", "invalid_role"),
        ({"role": "viewer"}, "name", "missing_field"),
        ({"name": "CI"}, "role", "missing_field"),
        ({"name": "", "role": "viewer"}, "name", "invalid_name"),
        ({"name": "   ", "role": "viewer"}, "name", "invalid_name"),
        ({"name": "x" * 101, "role": "viewer"}, "name", "invalid_name"),
        ({"name": 7, "role": "viewer"}, "name", "invalid_name"),
        ({"name": "CI\u2028pipeline", "role": "viewer"}, "name", "invalid_name"),
        ({"name": "CI\x1b[31m", "role": "viewer"}, "name", "invalid_name"),
        ({"name": "CI", "role": "viewer", "key": "chosen-by-me"}, "key", "unknown_field"),
        ({"name": "CI", "role": "viewer", "id": "bootstrap"}, "id", "unknown_field"),
    ],
)
async def test_invalid_create_is_400_naming_the_field_and_writes_nothing(
    gateway: Gateway, body: dict[str, Any], field: str, code: str
) -> None:
    response = await admin_request(gateway, "POST", "/v1/admin-keys", json=body)

    await expect_problem(response, 400, code, field)
    assert await key_ids(gateway) == ["bootstrap"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/admin-keys", b'{"name": "CI \\ud800", "role": "viewer"}'),
        ("POST", "/v1/tokens", b'{"name": "CRM \\udfff", "access_level": "read_only"}'),
        ("PATCH", "/v1/tokens/{id}", b'{"name": "\\ud83d"}'),
    ],
    ids=["admin key", "token", "token edit"],
)
async def test_a_lone_surrogate_in_a_name_is_400_not_500(
    gateway: Gateway, method: str, path: str, body: bytes
) -> None:
    # Valid JSON ("\ud800" escapes) that no UTF-8 database column can hold.
    token = await gateway.create_token()
    response = await admin_request(
        gateway, method, path.format(id=token["id"]), data=body, headers={"Content-Type": "application/json"}
    )

    await expect_problem(response, 400, "invalid_name", "name")
    assert (await gateway.admin_call("GET", f"/v1/tokens/{token['id']}"))[1]["name"] == token["name"]


# --- viewer -------------------------------------------------------------------------------------------------


async def test_viewer_can_read_everything(gateway: Gateway) -> None:
    token = await gateway.create_token()
    viewer = await create_key(gateway, "viewer")

    for path in ("/v1/tokens", f"/v1/tokens/{token['id']}", "/v1/audit", "/v1/admin-keys", "/v1/session"):
        response = await as_key(gateway, viewer["key"], "GET", path)
        assert response.status == 200, (path, await response.text())


CHANGES = [
    ("POST", "/v1/tokens", {"name": "CRM", "access_level": "read_only"}),
    ("PATCH", "/v1/tokens/{token}", {"name": "renamed"}),
    ("POST", "/v1/tokens/{token}/rotate", {"grace_seconds": 60}),
    ("POST", "/v1/tokens/{token}/disable", None),
    ("POST", "/v1/tokens/{token}/enable", None),
    ("DELETE", "/v1/tokens/{token}", None),
    ("POST", "/v1/admin-keys", {"name": "escalate", "role": "admin"}),
    ("DELETE", "/v1/admin-keys/{viewer}", None),
    ("DELETE", "/v1/admin-keys/bootstrap", None),
]


@pytest.mark.parametrize(("method", "path", "body"), CHANGES, ids=[f"{m} {p}" for m, p, _ in CHANGES])
async def test_viewer_gets_403_on_every_change_and_nothing_is_written(
    gateway: Gateway, method: str, path: str, body: dict[str, Any] | None
) -> None:
    token = await gateway.create_token()
    await gateway.admin_call("POST", f"/v1/tokens/{token['id']}/disable")  # so that 'enable' would change it
    viewer = await create_key(gateway, "viewer")
    before = {
        "tokens": await gateway.admin_call("GET", "/v1/tokens"),
        "keys": await gateway.admin_call("GET", "/v1/admin-keys"),
        "audit": await audit_events(gateway),
    }

    response = await as_key(
        gateway, viewer["key"], method, path.format(token=token["id"], viewer=viewer["id"]), json=body
    )

    await expect_problem(response, 403, "insufficient_role")
    after = {
        "tokens": await gateway.admin_call("GET", "/v1/tokens"),
        "keys": await gateway.admin_call("GET", "/v1/admin-keys"),
        "audit": await audit_events(gateway),
    }
    assert after == before


# --- audit --------------------------------------------------------------------------------------------------


async def test_create_and_delete_are_audited_with_the_acting_key(gateway: Gateway) -> None:
    acting = await create_key(gateway, "admin", "ops")
    response = await as_key(
        gateway, acting["key"], "POST", "/v1/admin-keys", json={"name": "dash", "role": "viewer"}
    )
    created = await response.json()
    await as_key(gateway, acting["key"], "DELETE", f"/v1/admin-keys/{created['id']}")

    events = [event for event in await audit_events(gateway) if event["action"].startswith("admin_key.")]

    assert [(e["action"], e["actor"], e["details"]) for e in events] == [
        ("admin_key.delete", acting["id"], {"admin_key_id": created["id"]}),
        ("admin_key.create", acting["id"], {"admin_key_id": created["id"], "name": "dash", "role": "viewer"}),
        ("admin_key.create", "bootstrap", {"admin_key_id": acting["id"], "name": "ops", "role": "admin"}),
    ]
    text = json.dumps(await audit_events(gateway))
    assert acting["key"] not in text and created["key"] not in text


async def test_wrong_key_is_audited_with_the_source_ip_and_no_key_material(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-admin-key-Zq8vX1tK9mP2"

    await expect_problem(
        await as_key(gateway, wrong, "POST", "/v1/tokens", json={}), 401, "invalid_admin_key"
    )

    events = await audit_events(gateway)
    failures = [event for event in events if event["action"] == "admin_auth.failure"]
    assert len(failures) == 1
    assert failures[0]["actor"] == "anonymous"
    assert failures[0]["details"]["source_ip"] == "127.0.0.1"
    assert (failures[0]["details"]["method"], failures[0]["details"]["path"]) == ("POST", "/v1/tokens")
    assert wrong not in json.dumps(events)
    assert wrong not in caplog.text


async def test_a_forged_key_of_a_real_id_is_refused_and_audited(gateway: Gateway) -> None:
    created = await create_key(gateway, "admin")

    response = await as_key(gateway, forged(gateway, created["id"]), "GET", "/v1/tokens")

    await expect_problem(response, 401, "invalid_admin_key")
    assert "admin_auth.failure" in [event["action"] for event in await audit_events(gateway)]


async def test_a_well_formed_key_of_an_unknown_id_costs_no_argon2_verification(gateway: Gateway) -> None:
    verifications = gateway.core.hasher.verify_calls

    response = await as_key(gateway, forged(gateway, ABSENT_ID), "GET", "/v1/tokens")

    await expect_problem(response, 401, "invalid_admin_key")
    assert gateway.core.hasher.verify_calls == verifications


@pytest.mark.parametrize("shape", ["any string", "forged key of a real id", "real key with a bad checksum"])
async def test_a_repeated_wrong_key_costs_no_second_argon2_verification(gateway: Gateway, shape: str) -> None:
    created = await create_key(gateway, "viewer")
    wrong = {
        "any string": "wrong-admin-key-Zq8vX1tK9mP2",
        "forged key of a real id": forged(gateway, created["id"]),
        "real key with a bad checksum": created["key"][:-6] + ("A" if created["key"][-6] != "A" else "B") * 6,
    }[shape]
    verifications = gateway.core.hasher.verify_calls
    await expect_problem(await as_key(gateway, wrong, "GET", "/v1/tokens"), 401, "invalid_admin_key")
    assert gateway.core.hasher.verify_calls - verifications == 1
    verifications = gateway.core.hasher.verify_calls

    for _ in range(3):
        await expect_problem(await as_key(gateway, wrong, "GET", "/v1/tokens"), 401, "invalid_admin_key")

    assert gateway.core.hasher.verify_calls == verifications


async def test_a_good_key_costs_one_argon2_verification_in_all(gateway: Gateway) -> None:
    created = await create_key(gateway, "viewer")
    verifications = gateway.core.hasher.verify_calls

    for _ in range(3):
        assert (await as_key(gateway, created["key"], "GET", "/v1/session")).status == 200

    assert gateway.core.hasher.verify_calls - verifications == 1


async def test_undecodable_bytes_in_the_admin_authorization_are_401_not_500(gateway: Gateway) -> None:
    request = (
        b"GET /v1/tokens HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer \xff\x80k\r\n\r\n"
    )

    status, reply = await send_raw(gateway.admin, request)

    assert status == 401, reply
    assert b"invalid_admin_key" in reply
