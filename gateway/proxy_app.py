"""The data plane: every request is checked in order, then forwarded upstream.

credentials (credentials.py) -> token and secret (authenticator.py) -> client address (client_ip.py) ->
allowed ranges (ranges.py) -> access level (access_levels.py) -> usage (usage.py) -> upstream (forward.py)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger

from gateway.access_levels import normalize_path
from gateway.authenticator import Authenticator
from gateway.background import background_task
from gateway.core import Core, core_key
from gateway.credentials import presented_token
from gateway.failure_limits import FailureLimits, source_key
from gateway.forward import UpstreamForwarder, body_too_large, open_upstream_pool, upstream_request_head
from gateway.problems import GatewayError, problem_middleware

authenticator_key = web.AppKey("authenticator", Authenticator)
forwarder_key = web.AppKey("forwarder", UpstreamForwarder)
token_id_key = web.RequestKey("token_id", str)

access_log = logging.getLogger("gateway.access")


async def proxy_request(request: web.Request) -> web.StreamResponse:
    if not request.raw_path.startswith("/"):
        # An absolute-form target appended to the upstream URL would put its scheme into the upstream host
        # name ("http://api" + "admin://x/y" connects to "apiadmin"): only origin-form paths are forwarded.
        raise GatewayError(400, "invalid_request_target", "The request target must be a path, such as /api/posts.")
    app = request.app
    core = app[core_key]
    presented = presented_token(request.headers.get(hdrs.AUTHORIZATION), core.settings.token_prefix)
    client_ip, peer_trusted = core.client_ips.resolve(
        request.remote, request.headers.getall(hdrs.X_FORWARDED_FOR, ())
    )
    token = await app[authenticator_key].authenticate(presented, source_key(client_ip))
    token_id = token.record.id
    request[token_id_key] = token_id

    if token.ip_ranges is not None and (client_ip is None or client_ip not in token.ip_ranges):
        raise GatewayError(
            403, "ip_not_allowed", f"This token may not be used from {client_ip or 'this address'}."
        )

    level = token.access_level
    if level is None or not level.permits(request.method, normalize_path(request.raw_path.partition("?")[0])):
        raise GatewayError(
            403,
            "insufficient_access_level",
            f"The token's access level '{token.record.access_level}' does not allow"
            f" {request.method} on this path.",
        )
    max_body = core.settings.max_body_bytes if level.max_body_bytes is None else level.max_body_bytes
    if request.content_length is not None and request.content_length > max_body:
        raise body_too_large(max_body)

    core.usage.record(token_id, client_ip)
    forwarder = app[forwarder_key]
    head = upstream_request_head(
        request,
        host=forwarder.host,
        token_id=token_id,
        access_level=token.record.access_level,
        peer_trusted=peer_trusted,
    )
    return await forwarder.forward(request, head, max_body=max_body)


class ProxyAccessLogger(AbstractAccessLogger):
    """One line per request with the token id, never the Authorization header or the query string."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        token_id = request.get(token_id_key, "-") if isinstance(request, web.Request) else "-"
        self.logger.info(
            '%s "%s %s" %d %s token=%s %.1fms',
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            token_id,
            time * 1000,
        )


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    settings = app[core_key].settings
    upstream = settings.require_upstream()
    pool = open_upstream_pool(
        upstream, connect_timeout=settings.upstream_connect_timeout, read_timeout=settings.upstream_timeout
    )
    app[forwarder_key] = UpstreamForwarder(pool, upstream, body_timeout=settings.client_body_timeout)
    yield
    await pool.close()


def create_proxy_app(core: Core) -> web.Application:
    settings = core.settings
    app = web.Application(
        middlewares=[problem_middleware],
        handler_args={
            "max_headers": settings.max_header_count,
            "max_field_size": settings.max_header_bytes,
            "max_line_size": settings.max_header_bytes,
            "keepalive_timeout": 75.0,
        },
    )
    app[core_key] = core
    limits = FailureLimits(
        per_source=settings.failure_limit_per_source,
        per_token=settings.failure_limit_per_token,
        window=settings.failure_window,
    )
    app[authenticator_key] = Authenticator(core.tokens, core.hasher, prefix=settings.token_prefix, limits=limits)
    app.cleanup_ctx.append(_upstream_pool)
    app.cleanup_ctx.append(background_task("usage-writer", lambda app: app[core_key].usage.run()))
    if core.shared is not None:
        listener = core.shared.listener
        app.cleanup_ctx.append(background_task("token-change-listener", lambda app: listener.run()))
    app.router.add_route("*", "/{path:.*}", proxy_request)
    return app
