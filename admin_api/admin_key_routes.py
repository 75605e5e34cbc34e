"""Admin keys: who may use the admin API, with which role. A key is shown once, when created."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from admin_api.admin_auth import ROLES, admin_key_key, admin_key_prefix
from admin_api.validation import parse_name, read_json_object
from gateway.core import core_key
from gateway.problems import GatewayError, bad_request
from gateway.store import AdminKeyNotFound, LastAdminKey
from gateway.token_format import ID_PATTERN, issue_token, new_token_id
from gateway.tokens import AdminKeyRecord, AuditEvent, format_time, utc_now

routes = web.RouteTableDef()


def _view(record: AdminKeyRecord) -> dict[str, Any]:
    return {"id": record.id, "name": record.name, "role": record.role, "created_at": format_time(record.created_at)}


@routes.get("/v1/session")
async def session(request: web.Request) -> web.Response:
    """The admin key this request was made with, so a client (the page) knows what it may do."""
    return web.json_response(_view(request[admin_key_key]))


@routes.post("/v1/admin-keys")
async def create_admin_key(request: web.Request) -> web.Response:
    core = request.app[core_key]
    body = await read_json_object(request, {"name", "role"})
    for required in ("name", "role"):
        if required not in body:
            raise bad_request(required, f"{required} is required.", "missing_field")
    name = parse_name(body["name"])
    role = body["role"]
    if role not in ROLES:
        raise bad_request("role", f"role must be one of: {', '.join(ROLES)}.", "invalid_role")
    key_id = new_token_id()
    key = issue_token(admin_key_prefix(core.settings.token_prefix), key_id)
    # The whole key string is hashed, as for the bootstrap key (which may be any string).
    record = AdminKeyRecord(
        id=key_id, name=name, role=role, created_at=utc_now(), key_hash=await core.hasher.hash(str(key))
    )
    event = AuditEvent(
        action="admin_key.create",
        actor=request[admin_key_key].id,
        token_id=None,
        details={"admin_key_id": key_id, "name": name, "role": role},
    )
    await core.store.put_admin_key(record, event)
    return web.json_response(
        {**_view(record), "key": str(key)},
        status=201,
        headers={"Location": f"/v1/admin-keys/{key_id}", "Cache-Control": "no-store"},
    )


@routes.get("/v1/admin-keys")
async def list_admin_keys(request: web.Request) -> web.Response:
    keys = await request.app[core_key].store.list_admin_keys()
    return web.json_response({"items": [_view(key) for key in keys]})


@routes.delete("/v1/admin-keys/{key_id}")
async def delete_admin_key(request: web.Request) -> web.Response:
    core = request.app[core_key]
    key_id = request.match_info["key_id"]
    if key_id != "bootstrap" and not ID_PATTERN.fullmatch(key_id):
        raise GatewayError(404, "admin_key_not_found", "There is no admin key with this id.")
    event = AuditEvent(
        action="admin_key.delete", actor=request[admin_key_key].id, token_id=None, details={"admin_key_id": key_id}
    )
    try:
        await core.store.delete_admin_key(key_id, event)
    except AdminKeyNotFound:
        raise GatewayError(404, "admin_key_not_found", f"There is no admin key with id '{key_id}'.") from None
    except LastAdminKey:
        raise GatewayError(
            409, "last_admin_key", "This is the last key with the admin role; create another admin key first."
        ) from None
    return web.Response(status=204)
