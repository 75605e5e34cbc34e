"""The OpenAPI document: it names exactly the routes the app serves, is valid 3.1, and is public."""

from __future__ import annotations

from typing import Any

from aiohttp import hdrs
from openapi_spec_validator import validate

from admin_api.admin_auth import ROLES
from admin_api.validation import MAX_GRACE_SECONDS, NAME_MAX_LENGTH
from gateway.problems import PROBLEM_CONTENT_TYPE
from gateway.ranges import MAX_RANGES
from tests.conftest import Gateway

PAGE_PATHS = ("/", "/page/")
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


async def _document(gateway: Gateway) -> dict[str, Any]:
    response = await gateway.admin.get("/openapi.json")
    assert response.status == 200, await response.text()
    return dict(await response.json())


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


def _resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


async def test_document_names_exactly_the_registered_routes(gateway: Gateway) -> None:
    document = await _document(gateway)
    registered = {
        (route.method, route.resource.canonical)
        for route in gateway.admin.app.router.routes()
        if route.resource is not None
        and route.method != hdrs.METH_HEAD
        and route.resource.canonical != PAGE_PATHS[0]
        and not route.resource.canonical.startswith(PAGE_PATHS[1])
    }

    assert set(_operations(document)) == registered


async def test_document_is_valid_openapi_3_1(gateway: Gateway) -> None:
    document = await _document(gateway)

    assert document["openapi"].startswith("3.1.")
    validate(document)


async def test_openapi_json_needs_no_key_and_ignores_a_wrong_one(gateway: Gateway) -> None:
    anonymous = await gateway.admin.get("/openapi.json")
    wrong = await gateway.admin.get("/openapi.json", headers={"Authorization": "Bearer nope"})

    assert (anonymous.status, wrong.status) == (200, 200)
    assert anonymous.content_type == "application/json"


async def test_every_operation_but_the_public_ones_needs_the_bearer_key(gateway: Gateway) -> None:
    document = await _document(gateway)
    assert document["components"]["securitySchemes"]["adminKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An admin key.",
    }
    assert document["security"] == [{"adminKey": []}]

    public = {
        path for (_, path), operation in _operations(document).items() if operation.get("security") == []
    }
    assert public == {"/healthz", "/readyz", "/openapi.json"}
    for (method, path), operation in _operations(document).items():
        if path not in public:
            assert "401" in operation["responses"], (method, path)
        if path not in public and method != "GET":
            assert "403" in operation["responses"], (method, path)


async def test_every_error_answer_is_a_problem_document(gateway: Gateway) -> None:
    document = await _document(gateway)
    problem = document["components"]["schemas"]["Problem"]
    assert set(problem["properties"]) == {"type", "title", "status", "detail", "code", "field"}
    assert set(problem["required"]) == {"type", "title", "status", "detail", "code"}

    for (method, path), operation in _operations(document).items():
        for status, response in operation["responses"].items():
            if 400 <= int(status) and path != "/readyz":
                content = _resolve(document, response)["content"]
                assert set(content) == {PROBLEM_CONTENT_TYPE}, (method, path, status)


async def test_request_bodies_carry_the_validators_limits(gateway: Gateway) -> None:
    document = await _document(gateway)
    schemas = document["components"]["schemas"]
    status, levels = await gateway.admin_call("GET", "/v1/access-levels")
    assert status == 200

    create = schemas["TokenCreate"]
    assert create["additionalProperties"] is False
    assert set(create["required"]) == {"name", "access_level"}
    assert (create["properties"]["name"]["minLength"], create["properties"]["name"]["maxLength"]) == (
        1,
        NAME_MAX_LENGTH,
    )
    assert create["properties"]["allowed_ip_ranges"]["maxItems"] == MAX_RANGES
    assert create["properties"]["access_level"]["enum"] == [level["name"] for level in levels["items"]]
    grace = schemas["TokenRotate"]["properties"]["grace_seconds"]["oneOf"][0]
    assert (grace["minimum"], grace["maximum"]) == (0, MAX_GRACE_SECONDS)
    admin_key = schemas["AdminKeyCreate"]
    assert admin_key["properties"]["role"]["enum"] == list(ROLES)
    assert set(admin_key["required"]) == {"name", "role"}
    for name in ("TokenCreate", "TokenEdit", "TokenRotate", "Empty", "AdminKeyCreate"):
        assert schemas[name]["additionalProperties"] is False, name


async def test_views_show_no_secret_but_where_it_is_shown_once(gateway: Gateway) -> None:
    schemas = (await _document(gateway))["components"]["schemas"]

    assert not {"key", "key_hash", "token", "secret_hash"} & set(schemas["AdminKey"]["properties"])
    assert not {"key", "key_hash", "token", "secret_hash"} & set(schemas["Token"]["properties"])
    assert "key" in schemas["AdminKeyWithSecret"]["required"]
    assert "token" in schemas["TokenWithSecret"]["required"]
