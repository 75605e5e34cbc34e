"""The admin API application: authentication, the token routes, the audit log and health."""

from __future__ import annotations

import asyncio

from aiohttp import web

from admin_api import admin_key_routes, openapi, page_routes, token_routes, usage_routes
from admin_api.admin_auth import AdminAuthenticator, admin_auth_middleware, admin_authenticator_key
from admin_api.validation import parse_limit, query_parameters
from gateway.background import background_task
from gateway.core import Core, core_key
from gateway.health import readiness
from gateway.metrics.listener import metrics_response
from gateway.problems import GatewayError, bad_request, problem_middleware
from gateway.store import InvalidCursor

MAX_BODY_BYTES = 64 * 1024

routes = web.RouteTableDef()


@routes.get("/v1/audit")
async def list_audit(request: web.Request) -> web.Response:
    query = query_parameters(request, {"token_id", "limit", "cursor"})
    try:
        events, next_cursor = await request.app[core_key].store.list_audit(
            token_id=query.get("token_id"), limit=parse_limit(query.get("limit")), cursor=query.get("cursor")
        )
    except InvalidCursor as error:
        raise bad_request("cursor", f"cursor {error}.", "invalid_parameter") from None
    return web.json_response({"items": [event.view() for event in events], "next_cursor": next_cursor})


@routes.get("/healthz")
async def health(request: web.Request) -> web.Response:
    try:
        await asyncio.wait_for(request.app[core_key].store.ping(), timeout=2.0)
    except Exception:
        raise GatewayError(503, "store_unavailable", "The token store is not answering.") from None
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def ready(request: web.Request) -> web.Response:
    """Whether this admin process can do its work: the store answers, and Redis too when configured."""
    core = request.app[core_key]
    ready, checks = await readiness(core)
    if core.shared is not None:
        pending = await core.store.pending_changes(limit=1000) if checks["store"] == "ok" else []
        checks["undelivered_changes"] = str(len(pending))
    return web.json_response({"status": "ok" if ready else "unavailable", **checks}, status=200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics of this process (every plane it runs); an admin key of any role, unless public."""
    return await metrics_response(request.app[core_key])


def create_admin_app(core: Core, authenticator: AdminAuthenticator) -> web.Application:
    """The admin app. The caller runs `authenticator.bootstrap()` first, so a key exists before traffic."""
    app = web.Application(
        middlewares=[problem_middleware, admin_auth_middleware], client_max_size=MAX_BODY_BYTES
    )
    app[core_key] = core
    app[admin_authenticator_key] = authenticator
    app.router.add_routes(token_routes.routes)
    app.router.add_routes(usage_routes.routes)
    app.router.add_routes(admin_key_routes.routes)
    app.router.add_routes(routes)
    app.router.add_routes(openapi.routes)
    app.router.add_routes(page_routes.routes)
    if core.shared is not None:
        shared = core.shared
        app.cleanup_ctx.append(background_task("change-delivery", lambda app: shared.changes.run()))
        app.cleanup_ctx.append(background_task("usage-drainer", lambda app: shared.usage_drainer.run()))
    return app
