"""Who may use the admin API: a bearer admin key on every route but /healthz."""

from __future__ import annotations

import base64

import pytest

from tests.admin_api.conftest import admin_request, expect_problem
from tests.conftest import ADMIN_KEY, Gateway

ADMIN_REALM = 'Bearer realm="gateway-admin"'
ROUTES = [
    ("GET", "/v1/tokens"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/tokens/0000000000000000"),
    ("PATCH", "/v1/tokens/0000000000000000"),
    ("DELETE", "/v1/tokens/0000000000000000"),
    ("POST", "/v1/tokens/0000000000000000/rotate"),
    ("POST", "/v1/tokens/0000000000000000/disable"),
    ("POST", "/v1/tokens/0000000000000000/enable"),
    ("GET", "/v1/audit"),
]


async def test_request_without_a_key_is_401_with_www_authenticate(gateway: Gateway) -> None:
    response = await gateway.admin.get("/v1/tokens")

    await expect_problem(response, 401, "missing_credentials")
    assert response.headers["WWW-Authenticate"] == ADMIN_REALM


@pytest.mark.parametrize(
    "key", ["wrong-admin-key-0123456789abcdef", ADMIN_KEY + "x", ADMIN_KEY[:-1], "k" * 2000]
)
async def test_wrong_key_is_401_invalid_admin_key(gateway: Gateway, key: str) -> None:
    response = await gateway.admin.get("/v1/tokens", headers={"Authorization": f"Bearer {key}"})

    await expect_problem(response, 401, "invalid_admin_key")
    assert response.headers["WWW-Authenticate"] == ADMIN_REALM


@pytest.mark.parametrize(
    "authorization",
    [
        f"Basic {base64.b64encode(f'admin:{ADMIN_KEY}'.encode()).decode()}",
        f"Token {ADMIN_KEY}",
        ADMIN_KEY,
        "Bearer",
        "Bearer    ",
    ],
    ids=["basic", "token scheme", "no scheme", "bearer without key", "bearer with blanks"],
)
async def test_other_scheme_or_empty_bearer_is_401(gateway: Gateway, authorization: str) -> None:
    response = await gateway.admin.get("/v1/tokens", headers={"Authorization": authorization})

    await expect_problem(response, 401, "missing_credentials")
    assert response.headers["WWW-Authenticate"] == ADMIN_REALM


async def test_bearer_scheme_is_case_insensitive(gateway: Gateway) -> None:
    response = await gateway.admin.get("/v1/tokens", headers={"Authorization": f"bearer {ADMIN_KEY}"})

    assert response.status == 200


async def test_an_api_token_is_not_an_admin_key(gateway: Gateway) -> None:
    created = await gateway.create_token(access_level="administrative")

    response = await gateway.admin.get("/v1/tokens", headers={"Authorization": f"Bearer {created['token']}"})

    await expect_problem(response, 401, "invalid_admin_key")


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
async def test_every_admin_route_needs_a_key(gateway: Gateway, method: str, path: str) -> None:
    response = await gateway.admin.request(method, path, json={"name": "CRM", "access_level": "read_only"})

    await expect_problem(response, 401, "missing_credentials")


async def test_refused_request_writes_nothing(gateway: Gateway) -> None:
    response = await gateway.admin.post(
        "/v1/tokens",
        json={"name": "CRM", "access_level": "read_only"},
        headers={"Authorization": "Bearer nope"},
    )
    await expect_problem(response, 401, "invalid_admin_key")

    status, listed = await gateway.admin_call("GET", "/v1/tokens")
    assert (status, listed["items"]) == (200, [])


async def test_healthz_needs_no_key(gateway: Gateway) -> None:
    response = await gateway.admin.get("/healthz")

    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_healthz_ignores_a_wrong_key(gateway: Gateway) -> None:
    response = await gateway.admin.get("/healthz", headers={"Authorization": "Bearer nope"})

    assert response.status == 200


async def test_unknown_route_without_a_key_is_401(gateway: Gateway) -> None:
    response = await gateway.admin.get("/v1/secrets")

    await expect_problem(response, 401, "missing_credentials")


async def test_unknown_route_with_a_key_is_404_problem(gateway: Gateway) -> None:
    response = await admin_request(gateway, "GET", "/v1/secrets")

    await expect_problem(response, 404, "not_found")


async def test_wrong_method_with_a_key_is_405_problem_with_allow(gateway: Gateway) -> None:
    response = await admin_request(gateway, "PUT", "/v1/tokens")

    await expect_problem(response, 405, "method_not_allowed")
    assert {"GET", "POST"} <= {method.strip() for method in response.headers["Allow"].split(",")}
