"""The admin API described as an OpenAPI 3.1 document, served at `GET /openapi.json` without a key.

The limits come from the modules that enforce them (validation, ranges, admin_auth) and the access levels from
the running settings, so the document cannot drift from the validators; a test compares its operations with
the routes the app registers, and schemathesis checks the live app's answers against it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from admin_api.admin_auth import BOOTSTRAP_KEY_ID, ROLES
from admin_api.validation import MAX_GRACE_SECONDS, MAX_PAGE_SIZE, NAME_MAX_LENGTH
from gateway.core import core_key
from gateway.problems import PROBLEM_CONTENT_TYPE
from gateway.ratelimits.policy import MAX_PER_SECONDS, MAX_REQUESTS, QuotaPeriod
from gateway.ranges import MAX_RANGES
from gateway.request_counts import OUTCOMES, RECENT_ADDRESSES, Granularity
from gateway.settings import Settings
from gateway.token_format import ID_LENGTH

OPENAPI_VERSION = "3.1.0"
TOKEN_ID_PATTERN = f"^[0-9A-Za-z]{{{ID_LENGTH}}}$"
Schema = dict[str, Any]

routes = web.RouteTableDef()


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"oneOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Schema], *, required: tuple[str, ...] | None = None) -> Schema:
    """A closed object: every property listed, nothing else; all required unless told otherwise."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties if required is None else required),
        "additionalProperties": False,
    }


TIMESTAMP: Schema = {"type": "string", "format": "date-time"}
NAME: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": NAME_MAX_LENGTH,
    "description": "Trimmed before the length check; no control characters, line breaks or lone surrogates.",
}

COUNT: Schema = {"type": "integer", "minimum": 1, "maximum": MAX_REQUESTS}
RATE_LIMIT: Schema = _nullable(
    {
        **_object(
            {
                "requests": COUNT,
                "per_seconds": {"type": "integer", "minimum": 1, "maximum": MAX_PER_SECONDS},
                "burst": _nullable({**COUNT, "description": "Requests allowed back to back; null: `requests`."}),
            },
            required=("requests", "per_seconds"),
        ),
        "description": "On average `requests` per `per_seconds` seconds (GCRA), shared by every replica;"
        " null: unlimited. Refused with 429 `rate_limited`.",
    }
)
QUOTA: Schema = _nullable(
    {
        **_object({"requests": COUNT, "period": {"type": "string", "enum": [p.value for p in QuotaPeriod]}}),
        "description": "`requests` per UTC calendar day or month, or in total (never refilled); null:"
        " unlimited. Refused with 429 `quota_exceeded`.",
    }
)


def _schemas(settings: Settings) -> dict[str, Schema]:
    levels = list(settings.access_levels)
    ranges: Schema = {
        "type": "array",
        "maxItems": MAX_RANGES,
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": 64,
            "description": "An IPv4/IPv6 address or CIDR.",
        },
    }
    token_fields: dict[str, Schema] = {
        "name": NAME,
        "access_level": {"type": "string", "enum": levels},
        "allowed_ip_ranges": ranges,
        "expires_at": _nullable({**TIMESTAMP, "description": "In the future; null for never."}),
        "rate_limit": RATE_LIMIT,
        "quota": QUOTA,
    }
    token = _object(
        {
            "id": {"type": "string", "pattern": TOKEN_ID_PATTERN},
            "name": {"type": "string"},
            # A token keeps its level when the configuration later drops it, so the view is any string.
            "access_level": {"type": "string"},
            "allowed_ip_ranges": {"type": "array", "items": {"type": "string"}},
            "status": {"type": "string", "enum": ["enabled", "disabled"]},
            "expires_at": _nullable(TIMESTAMP),
            "created_at": TIMESTAMP,
            "updated_at": TIMESTAMP,
            "rotated_at": _nullable(TIMESTAMP),
            "last_used_at": _nullable(TIMESTAMP),
            "last_used_ip": _nullable({"type": "string"}),
            "previous_secret_expires_at": _nullable(TIMESTAMP),
            "version": {
                "type": "integer",
                "minimum": 1,
                "description": "Grows by one with every change; send it back in an edit to refuse a stale one.",
            },
            "rate_limit": RATE_LIMIT,
            "quota": QUOTA,
            "recent_addresses": _nullable(
                {
                    "type": "array",
                    "maxItems": RECENT_ADDRESSES,
                    "items": _object(
                        {"address": {"type": "string"}, "uses": {"type": "integer", "minimum": 1}, "last_used_at": TIMESTAMP}
                    ),
                    "description": "In single-token answers (not in the list): the last few distinct client"
                    " addresses the token was allowed from, most recent first, with their requests; null if they"
                    " cannot be read.",
                }
            ),
            "previous_secret": {
                **_object(
                    {
                        "last_used_at": _nullable(TIMESTAMP),
                        "last_used_ip": _nullable({"type": "string"}),
                        "uses": {"type": "integer", "minimum": 0},
                    }
                ),
                "description": "Only while a rotation's grace runs: how the previous secret was used since the"
                " rotation, written in batches like last_used_at.",
            },
        },
        required=(
            "id", "name", "access_level", "allowed_ip_ranges", "status", "expires_at", "created_at",
            "updated_at", "rotated_at", "last_used_at", "last_used_ip", "previous_secret_expires_at", "version",
            "rate_limit", "quota",
        ),
    )
    edit_fields: dict[str, Schema] = {
        **token_fields,
        "version": {
            "type": "integer",
            "minimum": 1,
            "description": "The version this edit was made from; if the token has changed since: 409 `conflict`.",
        },
    }
    admin_key = _object(
        {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "role": {"type": "string", "enum": list(ROLES)},
            "created_at": TIMESTAMP,
        }
    )
    return {
        "Problem": _object(
            {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": {"type": "string"},
                "code": {"type": "string"},
                "field": {"type": "string", "description": "The request field or parameter at fault."},
            },
            required=("type", "title", "status", "detail", "code"),
        ),
        "TokenCreate": _object(token_fields, required=("name", "access_level")),
        "TokenEdit": _object(edit_fields, required=()),
        "TokenRotate": _object(
            {"grace_seconds": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_GRACE_SECONDS})},
            required=(),
        ),
        "Empty": _object({}, required=()),
        "Token": token,
        "TokenWithSecret": {
            **token,
            "properties": {
                **token["properties"],
                "token": {"type": "string", "description": "Shown only here."},
            },
            "required": [*token["required"], "token"],
        },
        "TokenListed": {
            **token,
            "properties": {
                **token["properties"],
                "requests_24h": _nullable(
                    {
                        "type": "integer",
                        "minimum": 0,
                        "description": "Requests of every outcome in the current UTC hour and the 23 before"
                        " it; null when the counts cannot be read.",
                    }
                ),
            },
            "required": [*token["required"], "requests_24h"],
        },
        "TokenList": _object(
            {"items": {"type": "array", "items": _ref("TokenListed")}, "next_cursor": _nullable({"type": "string"})}
        ),
        "UsageBucket": _object(
            {"start": TIMESTAMP, **{outcome.value: {"type": "integer", "minimum": 0} for outcome in OUTCOMES}}
        ),
        "TokenUsage": _object(
            {
                "token_id": {"type": "string"},
                "granularity": {"type": "string", "enum": [g.value for g in Granularity]},
                "bucket_seconds": {"type": "integer", "enum": [g.seconds for g in Granularity]},
                "from": TIMESTAMP,
                "to": {**TIMESTAMP, "description": "The end of the current bucket (exclusive)."},
                "outcomes": {"type": "array", "items": {"type": "string", "enum": [o.value for o in OUTCOMES]}},
                "totals": _object({outcome.value: {"type": "integer", "minimum": 0} for outcome in OUTCOMES}),
                "buckets": {
                    "type": "array",
                    "items": _ref("UsageBucket"),
                    "description": "Oldest first, the current bucket last: 168 hours or 90 days, zeros included.",
                },
            }
        ),
        "AuditEvent": _object(
            {
                "id": {"type": "integer"},
                "at": TIMESTAMP,
                "action": {"type": "string"},
                "actor": {"type": "string", "description": "The acting admin key's id, or 'anonymous'."},
                "token_id": _nullable({"type": "string"}),
                "details": {"type": "object"},
            }
        ),
        "AuditList": _object(
            {
                "items": {"type": "array", "items": _ref("AuditEvent")},
                "next_cursor": _nullable({"type": "string"}),
            }
        ),
        "AdminKeyCreate": _object({"name": NAME, "role": {"type": "string", "enum": list(ROLES)}}),
        "AdminKey": admin_key,
        "AdminKeyWithSecret": {
            **admin_key,
            "properties": {
                **admin_key["properties"],
                "key": {"type": "string", "description": "Shown only here."},
            },
            "required": [*admin_key["required"], "key"],
        },
        "AdminKeyList": _object({"items": {"type": "array", "items": _ref("AdminKey")}}),
        "AccessLevelList": _object(
            {
                "items": {
                    "type": "array",
                    "items": _object({"name": {"type": "string"}, "description": {"type": "string"}}),
                }
            }
        ),
        "Health": _object({"status": {"type": "string", "const": "ok"}}),
        "Readiness": _object(
            {
                "status": {"type": "string", "enum": ["ok", "unavailable"]},
                "store": {"type": "string"},
                "redis": {"type": "string"},
                "undelivered_changes": {"type": "string"},
                "rate_limits": {"type": "string", "enum": ["shared", "per process (redis unavailable)"]},
            },
            required=("status", "store", "redis"),
        ),
    }


def _json(schema: Schema, description: str, headers: dict[str, Schema] | None = None) -> Schema:
    response: Schema = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = {name: {"required": True, "schema": value} for name, value in headers.items()}
    return response


def _problem(description: str, *, header: str | None = None) -> Schema:
    response: Schema = {
        "description": description,
        "content": {PROBLEM_CONTENT_TYPE: {"schema": _ref("Problem")}},
    }
    if header is not None:
        response["headers"] = {header: {"required": True, "schema": {"type": "string"}}}
    return response


PROBLEMS: dict[str, Schema] = {
    "400": _problem("The request is invalid; `field` names the field or parameter at fault."),
    "401": _problem("No admin key, or not a valid one.", header="WWW-Authenticate"),
    "403": _problem("The admin key's role may only read (`insufficient_role`)."),
    "404": _problem("There is no such token or admin key."),
    "409": _problem(
        "The last key with the admin role cannot be deleted (`last_admin_key`); or the token changed since the"
        " version an edit was made from (`conflict`); or there is no grace period to end (`no_grace`)."
    ),
    "413": _problem("The body is larger than the admin API accepts."),
    "429": _problem(
        "Too many wrong admin keys from this address (`too_many_failures`); retry after `Retry-After` seconds.",
        header="Retry-After",
    ),
    "503": _problem("The store is not answering (`store_unavailable`), or the request counts cannot be read"
                    " (`usage_unavailable`)."),
}


def _operation(
    operation_id: str,
    summary: str,
    responses: dict[str, Schema],
    problems: str,
    *,
    body: str | None = None,
    body_required: bool = True,
    parameters: list[Schema] | None = None,
    public: bool = False,
) -> Schema:
    """`problems` lists the 4xx/5xx status codes the operation may answer, as space-separated codes."""
    operation: Schema = {"operationId": operation_id, "summary": summary, "responses": {**responses}}
    statuses = problems.split()
    if "401" in statuses:
        statuses.append("429")  # wherever a key is checked, wrong keys are limited
    for status in statuses:
        operation["responses"][status] = {"$ref": f"#/components/responses/Problem{status}"}
    if body is not None:
        operation["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if parameters:
        operation["parameters"] = parameters
    if public:
        operation["security"] = []
    return operation


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path(name: str, pattern: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": pattern}}


def build_openapi(settings: Settings) -> dict[str, Any]:
    limit = _query(
        "limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE}, "Page size; 100 by default."
    )
    cursor = _query("cursor", {"type": "string"}, "The `next_cursor` of the previous page.")
    token_id = [_path("token_id", TOKEN_ID_PATTERN)]
    key_id = [_path("key_id", f"^({BOOTSTRAP_KEY_ID}|[0-9A-Za-z]{{{ID_LENGTH}}})$")]
    token = _json(_ref("Token"), "The token.")
    token_shown_once = {"Cache-Control": {"type": "string", "const": "no-store"}}
    no_content = {"204": {"description": "Done."}}

    def change(operation_id: str, summary: str) -> Schema:
        return _operation(
            operation_id,
            summary,
            {"200": token},
            "400 401 403 404 413",
            body="Empty",
            body_required=False,
            parameters=token_id,
        )

    paths: dict[str, Schema] = {
        "/v1/tokens": {
            "get": _operation(
                "listTokens",
                "List tokens, newest first",
                {"200": _json(_ref("TokenList"), "A page of tokens.")},
                "400 401",
                parameters=[
                    _query(
                        "status",
                        {"type": "string", "enum": ["enabled", "disabled"]},
                        "Only tokens in this status.",
                    ),
                    _query("unused_since", TIMESTAMP, "Only tokens not used since this moment (or never)."),
                    limit,
                    cursor,
                ],
            ),
            "post": _operation(
                "createToken",
                "Create a token; its string is shown in this answer only",
                {
                    "201": _json(
                        _ref("TokenWithSecret"),
                        "The new token.",
                        {"Location": {"type": "string"}, **token_shown_once},
                    )
                },
                "400 401 403 413",
                body="TokenCreate",
            ),
        },
        "/v1/tokens/{token_id}": {
            "get": _operation("getToken", "Read a token", {"200": token}, "401 404", parameters=token_id),
            "patch": _operation(
                "editToken",
                "Edit a token's name, access level, IP ranges or expiry",
                {"200": token},
                "400 401 403 404 409 413",
                body="TokenEdit",
                body_required=False,
                parameters=token_id,
            ),
            "delete": _operation(
                "deleteToken", "Delete a token", no_content, "401 403 404", parameters=token_id
            ),
        },
        "/v1/tokens/{token_id}/rotate": {
            "post": _operation(
                "rotateToken",
                "Issue a new secret; the old one keeps working for grace_seconds",
                {"200": _json(_ref("TokenWithSecret"), "The token with its new string.", token_shown_once)},
                "400 401 403 404 413",
                body="TokenRotate",
                body_required=False,
                parameters=token_id,
            )
        },
        "/v1/tokens/{token_id}/usage": {
            "get": _operation(
                "getTokenUsage",
                "Requests per hour (last 7 days) or per day (last 90), by outcome",
                {"200": _json(_ref("TokenUsage"), "The token's request counts.")},
                "400 401 404 503",
                parameters=[
                    *token_id,
                    _query(
                        "granularity",
                        {"type": "string", "enum": [g.value for g in Granularity]},
                        "hour (the default) or day.",
                    ),
                ],
            )
        },
        "/v1/tokens/{token_id}/end-grace": {
            "post": _operation(
                "endTokenGrace",
                "End a rotation's grace period now: the previous secret stops working",
                {"200": token},
                "400 401 403 404 409 413",
                body="Empty",
                body_required=False,
                parameters=token_id,
            )
        },
        "/v1/tokens/{token_id}/disable": {"post": change("disableToken", "Disable a token")},
        "/v1/tokens/{token_id}/enable": {"post": change("enableToken", "Enable a token")},
        "/v1/audit": {
            "get": _operation(
                "listAudit",
                "The audit log, newest first",
                {"200": _json(_ref("AuditList"), "A page of audit events.")},
                "400 401",
                parameters=[
                    _query("token_id", {"type": "string"}, "Only events about this token."),
                    limit,
                    cursor,
                ],
            )
        },
        "/v1/admin-keys": {
            "get": _operation(
                "listAdminKeys",
                "List admin keys (never a key or its hash)",
                {"200": _json(_ref("AdminKeyList"), "Every admin key.")},
                "401",
            ),
            "post": _operation(
                "createAdminKey",
                "Create an admin key; it is shown in this answer only",
                {
                    "201": _json(
                        _ref("AdminKeyWithSecret"),
                        "The new admin key.",
                        {"Location": {"type": "string"}, **token_shown_once},
                    )
                },
                "400 401 403 413",
                body="AdminKeyCreate",
            ),
        },
        "/v1/admin-keys/{key_id}": {
            "delete": _operation(
                "deleteAdminKey",
                "Delete an admin key; it stops working at once",
                no_content,
                "401 403 404 409",
                parameters=key_id,
            )
        },
        "/v1/session": {
            "get": _operation(
                "getSession",
                "The admin key this request was made with",
                {"200": _json(_ref("AdminKey"), "The key.")},
                "401",
            )
        },
        "/v1/access-levels": {
            "get": _operation(
                "listAccessLevels",
                "The configured access levels, in configuration order",
                {"200": _json(_ref("AccessLevelList"), "Every access level.")},
                "400 401",
            )
        },
        "/healthz": {
            "get": _operation(
                "health",
                "Whether the store answers",
                {"200": _json(_ref("Health"), "Healthy.")},
                "503",
                public=True,
            )
        },
        "/readyz": {
            "get": _operation(
                "ready",
                "Whether this process can do its work",
                {
                    "200": _json(_ref("Readiness"), "Ready."),
                    "503": _json(_ref("Readiness"), "Not ready; the members say what is missing."),
                },
                "",
                public=True,
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "This process's metrics in the Prometheus text format (public with metrics_public)",
                {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4; no secret in it.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                "401",
            )
        },
        "/openapi.json": {
            "get": _operation(
                "openapi",
                "This document",
                {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
                "",
                public=True,
            )
        },
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "API token gateway: admin API",
            "version": "1",
            "description": "Errors are RFC 9457 problem details (application/problem+json) with a `code`.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(settings),
            "responses": {f"Problem{status}": response for status, response in PROBLEMS.items()},
            "securitySchemes": {
                "adminKey": {"type": "http", "scheme": "bearer", "description": "An admin key."}
            },
        },
        "security": [{"adminKey": []}],
    }


@routes.get("/openapi.json")
async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(build_openapi(request.app[core_key].settings))
