"""The token lifecycle: create, list, read, edit, rotate, disable, enable, delete.

Each change is validated whole before anything is written, committed with its audit event in one store
transaction, then written through to the token cache, so the very next proxied request sees it.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

from aiohttp import web

from admin_api.admin_auth import admin_key_key
from admin_api.usage_routes import in_grace, token_answer, usage_views
from admin_api.validation import (
    parse_access_level,
    parse_expires_at,
    parse_grace_seconds,
    parse_ip_ranges,
    parse_limit,
    parse_name,
    parse_quota,
    parse_rate_limit,
    parse_status,
    parse_time_parameter,
    parse_version,
    query_parameters,
    read_json_object,
)
from gateway.core import core_key
from gateway.problems import GatewayError, bad_request
from gateway.ratelimits.policy import Quota, RateLimit
from gateway.store import InvalidCursor, TokenNotFound
from gateway.token_format import ID_PATTERN, issue_token, new_token_id
from gateway.tokens import AuditEvent, TokenRecord, TokenStatus, format_time

routes = web.RouteTableDef()

CREATE_FIELDS = frozenset({"name", "access_level", "allowed_ip_ranges", "expires_at", "rate_limit", "quota"})
EDIT_FIELDS = CREATE_FIELDS | {"version"}
ROTATE_FIELDS = frozenset({"grace_seconds"})


def _not_found(token_id: str) -> GatewayError:
    return GatewayError(404, "token_not_found", f"There is no token with id '{token_id}'.")


def _token_id(request: web.Request) -> str:
    token_id = request.match_info["token_id"]
    if not ID_PATTERN.fullmatch(token_id):
        raise GatewayError(404, "token_not_found", "There is no token with this id.")
    return token_id


def _actor(request: web.Request) -> str:
    return request[admin_key_key].id


def _event(request: web.Request, action: str, token_id: str, **details: Any) -> AuditEvent:
    return AuditEvent(
        action=action, actor=_actor(request), token_id=token_id, details=details, at=request.app[core_key].clock()
    )


def _audit_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (RateLimit, Quota)):
        return value.view()
    if hasattr(value, "tzinfo"):
        return format_time(value)
    return value


@routes.post("/v1/tokens")
async def create_token(request: web.Request) -> web.Response:
    core = request.app[core_key]
    body = await read_json_object(request, CREATE_FIELDS)
    for required in ("name", "access_level"):
        if required not in body:
            raise bad_request(required, f"{required} is required.", "missing_field")
    name = parse_name(body["name"])
    access_level = parse_access_level(body["access_level"], core.settings.access_levels)
    ranges = parse_ip_ranges(body.get("allowed_ip_ranges", []))
    now = core.clock()
    expires_at = parse_expires_at(body.get("expires_at"), now=now)
    rate_limit = parse_rate_limit(body.get("rate_limit"))
    quota = parse_quota(body.get("quota"))

    token_id = new_token_id()
    token = issue_token(core.settings.token_prefix, token_id)
    record = TokenRecord(
        id=token_id,
        name=name,
        access_level=access_level,
        allowed_ip_ranges=ranges,
        status=TokenStatus.ENABLED,
        expires_at=expires_at,
        created_at=now,
        updated_at=now,
        rotated_at=None,
        last_used_at=None,
        last_used_ip=None,
        secret_hash=await core.hasher.hash(token.secret),
        rate_limit=rate_limit,
        quota=quota,
    )
    event = _event(
        request,
        "token.create",
        token_id,
        name=name,
        access_level=access_level,
        allowed_ip_ranges=list(ranges),
        expires_at=format_time(expires_at),
        rate_limit=_audit_value(rate_limit),
        quota=_audit_value(quota),
    )
    await core.store.insert_token(record, event)
    await core.changes.changed(record)
    return web.json_response(
        {**await token_answer(core, record), "token": str(token)},
        status=201,
        headers={"Location": f"/v1/tokens/{token_id}", "Cache-Control": "no-store"},
    )


@routes.get("/v1/tokens")
async def list_tokens(request: web.Request) -> web.Response:
    core = request.app[core_key]
    query = query_parameters(request, {"status", "unused_since", "limit", "cursor"})
    try:
        records, next_cursor = await core.store.list_tokens(
            status=parse_status(query.get("status")),
            unused_since=parse_time_parameter("unused_since", query.get("unused_since")),
            limit=parse_limit(query.get("limit")),
            cursor=query.get("cursor"),
        )
    except InvalidCursor as error:
        raise bad_request("cursor", f"cursor {error}.", "invalid_parameter") from None
    return web.json_response({"items": await usage_views(core, records), "next_cursor": next_cursor})


@routes.get("/v1/tokens/{token_id}")
async def get_token(request: web.Request) -> web.Response:
    token_id = _token_id(request)
    core = request.app[core_key]
    record = await core.store.get_token(token_id)
    if record is None:
        raise _not_found(token_id)
    return web.json_response(await token_answer(core, record))


async def _change(request: web.Request, change: Any) -> TokenRecord:
    core = request.app[core_key]
    token_id = _token_id(request)
    try:
        record = await core.store.change_token(token_id, change)
    except TokenNotFound:
        raise _not_found(token_id) from None
    await core.changes.changed(record)
    return record


class _Unchanged(Exception):
    """Raised inside a change to leave the record, the version and the audit log untouched."""

    def __init__(self, record: TokenRecord) -> None:
        self.record = record


async def _change_or_keep(request: web.Request, change: Any) -> TokenRecord:
    try:
        return await _change(request, change)
    except _Unchanged as unchanged:
        return unchanged.record


@routes.patch("/v1/tokens/{token_id}")
async def edit_token(request: web.Request) -> web.Response:
    core = request.app[core_key]
    body = await read_json_object(request, EDIT_FIELDS)
    wanted: dict[str, Any] = {}
    if "name" in body:
        wanted["name"] = parse_name(body["name"])
    if "access_level" in body:
        wanted["access_level"] = parse_access_level(body["access_level"], core.settings.access_levels)
    if "allowed_ip_ranges" in body:
        wanted["allowed_ip_ranges"] = parse_ip_ranges(body["allowed_ip_ranges"])
    if "expires_at" in body:
        wanted["expires_at"] = parse_expires_at(body["expires_at"], now=core.clock())
    if "rate_limit" in body:
        wanted["rate_limit"] = parse_rate_limit(body["rate_limit"])
    if "quota" in body:
        wanted["quota"] = parse_quota(body["quota"])
    expected = parse_version(body["version"]) if "version" in body else None

    def edit(current: TokenRecord) -> tuple[TokenRecord, AuditEvent]:
        if expected is not None and current.version != expected:
            raise GatewayError(
                409,
                "conflict",
                f"The token is at version {current.version}, not {expected}: it changed since you read it."
                " Read it again and reapply your edit.",
            )
        changes = {
            field: {"from": _audit_value(getattr(current, field)), "to": _audit_value(value)}
            for field, value in wanted.items()
            if getattr(current, field) != value
        }
        if not changes:
            raise _Unchanged(current)
        changed = dataclasses.replace(
            current, **{field: wanted[field] for field in changes}, updated_at=core.clock(), version=current.version + 1
        )
        return changed, _event(request, "token.edit", current.id, changes=changes)

    record = await _change_or_keep(request, edit)
    return web.json_response(await token_answer(core, record))


@routes.post("/v1/tokens/{token_id}/rotate")
async def rotate_token(request: web.Request) -> web.Response:
    core = request.app[core_key]
    token_id = _token_id(request)
    body = await read_json_object(request, ROTATE_FIELDS)
    grace_seconds = parse_grace_seconds(body.get("grace_seconds"))
    token = issue_token(core.settings.token_prefix, token_id)
    secret_hash = await core.hasher.hash(token.secret)

    def rotate(current: TokenRecord) -> tuple[TokenRecord, AuditEvent]:
        now = core.clock()
        changed = dataclasses.replace(
            current,
            secret_hash=secret_hash,
            previous_secret_hash=current.secret_hash if grace_seconds else None,
            previous_secret_expires_at=now + timedelta(seconds=grace_seconds) if grace_seconds else None,
            rotated_at=now,
            updated_at=now,
            version=current.version + 1,
        )
        return changed, _event(request, "token.rotate", current.id, grace_seconds=grace_seconds)

    record = await _change(request, rotate)
    return web.json_response(
        {**await token_answer(core, record), "token": str(token)}, headers={"Cache-Control": "no-store"}
    )


@routes.post("/v1/tokens/{token_id}/end-grace")
async def end_grace(request: web.Request) -> web.Response:
    """Stop accepting the previous secret now, once every integration uses the new one."""
    core = request.app[core_key]
    await read_json_object(request, ())

    def end(current: TokenRecord) -> tuple[TokenRecord, AuditEvent]:
        now = core.clock()
        if not in_grace(current, now):
            raise GatewayError(
                409, "no_grace", "The token has no grace period running: only its current secret is accepted."
            )
        changed = dataclasses.replace(
            current,
            previous_secret_hash=None,
            previous_secret_expires_at=None,
            updated_at=now,
            version=current.version + 1,
        )
        was = format_time(current.previous_secret_expires_at)
        return changed, _event(request, "token.end_grace", current.id, previous_secret_expires_at=was)

    record = await _change(request, end)
    return web.json_response(await token_answer(core, record))


async def _set_status(request: web.Request, status: TokenStatus, action: str) -> web.Response:
    await read_json_object(request, ())

    def change(current: TokenRecord) -> tuple[TokenRecord, AuditEvent]:
        if current.status is status:
            raise _Unchanged(current)
        now = request.app[core_key].clock()
        changed = dataclasses.replace(current, status=status, updated_at=now, version=current.version + 1)
        return changed, _event(request, action, current.id)

    record = await _change_or_keep(request, change)
    return web.json_response(await token_answer(request.app[core_key], record))


@routes.post("/v1/tokens/{token_id}/disable")
async def disable_token(request: web.Request) -> web.Response:
    return await _set_status(request, TokenStatus.DISABLED, "token.disable")


@routes.post("/v1/tokens/{token_id}/enable")
async def enable_token(request: web.Request) -> web.Response:
    return await _set_status(request, TokenStatus.ENABLED, "token.enable")


@routes.delete("/v1/tokens/{token_id}")
async def delete_token(request: web.Request) -> web.Response:
    core = request.app[core_key]
    token_id = _token_id(request)
    record = await core.store.get_token(token_id)
    if record is None:
        raise _not_found(token_id)
    try:
        await core.store.delete_token(token_id, _event(request, "token.delete", token_id, name=record.name))
    except TokenNotFound:
        raise _not_found(token_id) from None
    await core.changes.deleted(token_id)
    return web.Response(status=204)
