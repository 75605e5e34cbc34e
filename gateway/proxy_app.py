"""The data plane: every request is checked in order, then forwarded upstream.

credentials (credentials.py) -> token and secret (authenticator.py) -> client address (client_ip.py) ->
allowed ranges (ranges.py) -> access level (access_levels.py) -> usage (usage.py) -> upstream (forward.py)

The port is served by http_server.py; this module is the one handler it runs, and the aiohttp Application that
holds the plane's lifecycle (the upstream pool, the usage writer, the token-change listener).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NamedTuple

from aiohttp import web

from gateway.access_levels import normalize_path
from gateway.authenticator import Authenticator, IdentifiedToken
from gateway.background import background_task
from gateway.client_ip import ClientAddress
from gateway.core import Core, core_key
from gateway.credentials import presented_token
from gateway.failure_limits import FailureLimits, source_key
from gateway.forward import (
    BODY_OVERRIDE_METHODS,
    UpstreamForwarder,
    body_too_large,
    gateway_headers,
    open_upstream_pool,
    refuse_method_override,
    upstream_request_head,
)
from gateway.health import HealthProbe
from gateway.http_server import (
    HttpLimits,
    HttpRequest,
    RequestHandler,
    date_header,
    http_handler_key,
    http_limits_key,
    http_metrics_key,
)
from gateway.problems import GatewayError
from gateway.token_cache import CachedToken

forwarder_key = web.AppKey("forwarder", UpstreamForwarder)


class ProxyHandler:
    """Decides on one request and forwards it; every refusal is a GatewayError (problem+json)."""

    def __init__(self, core: Core, authenticator: Authenticator, forwarder: UpstreamForwarder) -> None:
        self._settings = core.settings
        self._client_ips = core.client_ips
        self._usage = core.usage
        self._authenticator = authenticator
        self._forwarder = forwarder
        self._proto = b"http" if core.settings.proxy_tls_cert is None else b"https"
        path = core.settings.proxy_health_path
        self._health = HealthProbe(core, path) if path is not None else None

    async def __call__(self, request: HttpRequest) -> None:
        target = request.target
        if not target.startswith(b"/"):
            # An absolute-form target appended to the upstream URL would put its scheme into the upstream host
            # name ("http://api" + "admin://x/y" connects to "apiadmin"): only origin-form paths are forwarded.
            raise GatewayError(400, "invalid_request_target", "The request target must be a path, such as /api/posts.")
        if self._health is not None and self._health.matches(target):
            await _answer_health(request, self._health)
            return
        seen = request.connection_state
        if not isinstance(seen, _SeenHeaders) or seen.headers != request.headers:
            seen = request.connection_state = self._read_headers(request)
        client_ip = seen.client_ip
        authenticator = self._authenticator
        token = authenticator.accept_known(seen.identified) or await authenticator.authenticate(
            seen.identified, source_key(client_ip)
        )
        token_id = request.token_id = token.record.id
        decision = seen.decision
        if (
            decision is None
            or decision.token is not token
            or decision.target != target
            or decision.method != request.method
        ):
            # Entries are replaced, never changed, when a token changes: the same entry, method and target get
            # the same answer (the entry's own checks, enabled and expiry, ran above).
            decision = seen.decision = self._decide(request, token, client_ip, seen.upstream_head)
        if request.content_length is not None and request.content_length > decision.max_body:
            raise body_too_large(decision.max_body)
        if request.body is not None and not decision.body_allowed:
            raise GatewayError(
                403,
                "insufficient_access_level",
                f"The token's access level '{token.record.access_level}' does not allow a POST with a body on"
                " this path: the upstream may run it as the PUT, PATCH or DELETE its body names.",
            )
        self._usage.record(token_id, client_ip)
        await self._forwarder.forward(request, decision.upstream_head, max_body=decision.max_body)

    def _decide(
        self, request: HttpRequest, token: CachedToken, client_ip: ClientAddress | None, upstream_head: bytes
    ) -> _Decision:
        """Whether this token may make this request from this address: a 403 naming the reason, or what to
        send upstream."""
        refuse_method_override(request.target)
        if token.ip_ranges is not None and (client_ip is None or client_ip not in token.ip_ranges):
            raise GatewayError(
                403, "ip_not_allowed", f"This token may not be used from {client_ip or 'this address'}."
            )
        level = token.access_level
        path = normalize_path(request.target.partition(b"?")[0].decode("utf-8", "surrogateescape"))
        if level is None or not level.permits(request.method, path):
            raise GatewayError(
                403,
                "insufficient_access_level",
                f"The token's access level '{token.record.access_level}' does not allow"
                f" {request.method} on this path.",
            )
        max_body = self._settings.max_body_bytes if level.max_body_bytes is None else level.max_body_bytes
        head = upstream_head + gateway_headers(token.record.id, token.record.access_level)
        body_allowed = (
            request.method != "POST"
            or not self._settings.body_method_override
            or all(level.permits(method, path) for method in BODY_OVERRIDE_METHODS)
        )
        return _Decision(token, request.method, request.target, head, max_body, body_allowed)

    def _read_headers(self, request: HttpRequest) -> _SeenHeaders:
        authorization, forwarded_for = _credential_headers(request.headers)
        identified = self._authenticator.identify(presented_token(authorization, self._settings.token_prefix))
        client_ip, peer_trusted = self._client_ips.resolve(request.peer, forwarded_for)
        upstream_head = upstream_request_head(
            request, host=self._forwarder.host, peer_trusted=peer_trusted, proto=self._proto
        )
        return _SeenHeaders(request.headers, identified, client_ip, upstream_head)


class _SeenHeaders:
    """What a connection's last request headers said, and the last decision taken on them. API clients send
    the same headers on every request of a connection, so comparing the list (in C) replaces reading them
    again; the token itself is still judged against its cache entry on every request."""

    __slots__ = ("client_ip", "decision", "headers", "identified", "upstream_head")

    def __init__(
        self,
        headers: list[tuple[bytes, bytes]],
        identified: IdentifiedToken,
        client_ip: ClientAddress | None,
        upstream_head: bytes,
    ) -> None:
        self.headers = headers
        self.identified = identified
        self.client_ip = client_ip
        self.upstream_head = upstream_head
        self.decision: _Decision | None = None


class _Decision(NamedTuple):
    """A request allowed: by which cache entry, for which method and target; the head to send upstream (the
    client's headers and the gateway's), the body limit, and whether a body is allowed at all."""

    token: CachedToken
    method: str
    target: bytes
    upstream_head: bytes
    max_body: int
    body_allowed: bool  # False for a POST whose body could name a method the level withholds


async def _answer_health(request: HttpRequest, probe: HealthProbe) -> None:
    """The load balancers' answer, without credentials; never forwarded."""
    request.code = "health"
    if request.method not in ("GET", "HEAD"):
        raise GatewayError(
            405, "method_not_allowed", "The health path answers GET and HEAD.", headers={"Allow": "GET, HEAD"}
        )
    status, body = await probe.answer()
    request.respond(
        status,
        b"OK" if status == 200 else b"Service Unavailable",
        b"Content-Type: application/json\r\nCache-Control: no-store\r\n" + date_header(),
        body,
    )


def _credential_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, list[str]]:
    """The Authorization value and the X-Forwarded-For values, in one pass over the raw headers."""
    authorization = None
    forwarded_for: list[str] = []
    for name, value in headers:
        size = len(name)
        if size == 13 and name.lower() == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif size == 15 and name.lower() == b"x-forwarded-for":
            forwarded_for.append(value.decode("latin-1"))
    return authorization, forwarded_for


async def _proxy_handler(app: web.Application) -> AsyncIterator[None]:
    core = app[core_key]
    settings = core.settings
    upstream = settings.require_upstream()
    pool = open_upstream_pool(
        upstream, connect_timeout=settings.upstream_connect_timeout, read_timeout=settings.upstream_timeout
    )
    forwarder = app[forwarder_key] = UpstreamForwarder(pool, upstream, body_timeout=settings.client_body_timeout)
    core.metrics.gauges["upstream_connections"] = lambda: pool.open_count
    limits = FailureLimits(
        per_source=settings.failure_limit_per_source,
        per_token=settings.failure_limit_per_token,
        window=settings.failure_window,
    )
    authenticator = Authenticator(core.tokens, core.hasher, prefix=settings.token_prefix, limits=limits)
    handler: RequestHandler = ProxyHandler(core, authenticator, forwarder)
    app[http_handler_key] = handler
    yield
    await pool.close()


def create_proxy_app(core: Core) -> web.Application:
    """The proxy plane: serve it with http_server.HttpRunner (aiohttp's AppRunner would not route requests)."""
    settings = core.settings
    app = web.Application()
    app[core_key] = core
    app[http_metrics_key] = core.metrics
    app[http_limits_key] = HttpLimits(
        max_header_count=settings.max_header_count,
        max_header_bytes=settings.max_header_bytes,
        header_timeout=settings.client_header_timeout,
        keepalive_timeout=settings.keepalive_timeout,
    )
    app.cleanup_ctx.append(_proxy_handler)
    app.cleanup_ctx.append(background_task("usage-writer", lambda app: app[core_key].usage.run()))
    if core.shared is not None:
        listener = core.shared.listener
        app.cleanup_ctx.append(background_task("token-change-listener", lambda app: listener.run()))
    return app
