"""The data plane: every request is checked in order, then forwarded upstream.

credentials (credentials.py) -> token and secret (authenticator.py) -> client address (client_ip.py) ->
allowed ranges (ranges.py) -> the target's one reading (request_target.py) -> access level (access_levels.py)
-> the token's rate limit and quota (ratelimits/) -> usage (usage.py) -> upstream (forward.py), which is sent
the path that was judged

The port is served by http_server.py; this module is the handler it runs, and the aiohttp Application that
holds the plane's lifecycle (the decider, the upstream pool, the usage writer, the token-change listener).
The decision itself is decision.py's, shared with forward-auth (forward_auth.py) on its own port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NamedTuple

from aiohttp import web

from gateway.authenticator import Authenticator, presented_previous
from gateway.background import background_task
from gateway.core import Core, core_key
from gateway.decision import Caller, Decider, Verdict, body_method_refused, check_target, credential_headers
from gateway.failure_limits import FailureLimits
from gateway.forward import (
    UpstreamForwarder,
    body_too_large,
    gateway_headers,
    open_upstream_pool,
    upstream_request_head,
)
from gateway.forward_auth import ForwardAuthHandler, forward_auth_handler_key
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
from gateway.request_counts import Outcome
from gateway.token_cache import CachedToken
from gateway.tunnel import Tunnel, TunnelRegistry

forwarder_key = web.AppKey("forwarder", UpstreamForwarder)
tunnels_key = web.AppKey("tunnels", TunnelRegistry)


class ProxyHandler:
    """Decides on one request (decision.py) and forwards it; every refusal is a GatewayError (problem+json)."""

    def __init__(
        self, core: Core, decider: Decider, forwarder: UpstreamForwarder, tunnels: TunnelRegistry | None = None
    ) -> None:
        self._tunnels = tunnels
        self._usage = core.usage
        self._limiter = core.limiter
        self._decider = decider
        self._forwarder = forwarder
        self._proto = b"http" if core.settings.proxy_tls_cert is None else b"https"
        path = core.settings.proxy_health_path
        self._health = HealthProbe(core, path) if path is not None else None

    async def __call__(self, request: HttpRequest) -> None:
        target = request.target
        seen = request.connection_state
        decision = seen.decision if isinstance(seen, _SeenHeaders) else None
        if decision is None or decision.target != target:
            # A target this connection had allowed is a path and not the health path: both were checked then.
            check_target(target)
            if self._health is not None and self._health.matches(target):
                await _answer_health(request, self._health)
                return
        if not isinstance(seen, _SeenHeaders) or seen.headers != request.headers:
            seen = request.connection_state = self._read_headers(request)
            decision = None
        caller = seen.caller
        request.client = seen.client_text
        decider = self._decider
        token = decider.accept_known(caller.identified) or await decider.authenticate(caller)
        token_id = request.token_id = token.record.id
        if (
            decision is None
            or decision.token is not token
            or decision.target != target
            or decision.method != request.method
        ):
            # Entries are replaced, never changed, when a token changes: the same entry, method and target get
            # the same answer (the entry's own checks, enabled and expiry, ran above).
            try:
                decision = seen.decision = self._decide(request, token, seen, decision)
            except GatewayError as refusal:
                self._usage.refused(token_id, refusal.code)
                raise
        if request.content_length is not None and request.content_length > decision.max_body:
            raise body_too_large(decision.max_body)
        if request.body is not None and not decision.body_allowed:
            self._usage.count(token_id, Outcome.REFUSED_LEVEL)
            raise body_method_refused(token)
        record = token.record
        # Only now, with the secret, the address and the level all accepted, may a request use up a budget.
        if record.rate_limit is None and record.quota is None:
            limit_headers = b""
        else:
            try:
                limit_headers = await self._limiter.admit(record)
            except GatewayError as refusal:
                self._usage.refused(token_id, refusal.code)  # rate_limited, quota_exceeded
                raise
        self._usage.record(token_id, caller.client_ip)
        if token.memo_previous is not None and presented_previous(token, caller.identified.digest):
            self._usage.previous_secret_used(token.record, caller.client_ip)
        if request.upgrade == b"websocket" and request.method == "GET" and self._tunnels is not None:
            grant = _Grant(caller, token)
            await self._tunnels.relay(
                request,
                decision.upstream_target,
                decision.upstream_head,
                token_id,
                grant,
                response_headers=limit_headers,
            )
            return
        await self._forwarder.forward(
            request,
            decision.upstream_target,
            decision.upstream_head,
            max_body=decision.max_body,
            response_headers=limit_headers,
        )

    async def still_allowed(self, tunnel: Tunnel) -> bool:
        """Whether an open tunnel's token still allows it, judged as its upgrade request was. An outage of the
        store (or a failure limit) keeps the last version known rather than closing on a guess, up to what that
        version says itself: its expiry and the end of a grace period still close the tunnel."""
        grant = tunnel.judged
        assert isinstance(grant, _Grant)
        request = tunnel.request
        try:
            token = await self._decider.token(grant.caller)
            if token is not grant.token:
                self._decider.judge(token, request.method, request.target, grant.caller.client_ip, body=False)
                grant.token = token
        except GatewayError as error:
            undecided = error.status == 429 or error.status >= 500
            return undecided and self._decider.still_accepts(grant.token, grant.caller.identified)
        return True

    def _decide(
        self, request: HttpRequest, token: CachedToken, seen: _SeenHeaders, last: _Decision | None
    ) -> _Decision:
        """The decision on this request. Only its query is judged when the last one differed from it in the
        query alone (`Decider.with_query`): clients vary the query far more often than the path."""
        method, target = request.method, request.target
        if (
            last is not None
            and last.token is token
            and last.method == method
            and target.partition(b"?")[0] == last.target.partition(b"?")[0]
        ):
            verdict = self._decider.with_query(last.verdict, target)
            head = last.upstream_head
        else:
            verdict = self._decider.judge(token, method, target, seen.caller.client_ip, body=False)
            head = seen.upstream_head + gateway_headers(token.record.id, token.record.access_level)
        upstream_target = self._forwarder.upstream_target(verdict.target)
        return _Decision(
            token, method, target, verdict, upstream_target, head, verdict.max_body, verdict.body_allowed
        )

    def _read_headers(self, request: HttpRequest) -> _SeenHeaders:
        authorization, forwarded_for = credential_headers(request.headers)
        caller = self._decider.caller(authorization, request.peer, forwarded_for)
        upstream_head = upstream_request_head(
            request,
            host=self._forwarder.host,
            peer_trusted=caller.peer_trusted,
            proto=self._proto,
            client=caller.client_ip,
        )
        return _SeenHeaders(request.headers, caller, upstream_head)


class _SeenHeaders:
    """What a connection's last request headers said, and the last decision taken on them. API clients send
    the same headers on every request of a connection, so comparing the list (in C) replaces reading them
    again; the token itself is still judged against its cache entry on every request."""

    __slots__ = ("caller", "client_text", "decision", "headers", "upstream_head")

    def __init__(self, headers: list[tuple[bytes, bytes]], caller: Caller, upstream_head: bytes) -> None:
        self.headers = headers
        self.caller = caller
        self.client_text = None if caller.client_ip is None else caller.client_ip.text  # for the access log
        self.upstream_head = upstream_head
        self.decision: _Decision | None = None


class _Grant:
    """What an open tunnel was allowed by: the caller it was judged as, and the cache entry that last allowed
    it (entries are replaced on change, so a new one is judged again)."""

    __slots__ = ("caller", "token")

    def __init__(self, caller: Caller, token: CachedToken) -> None:
        self.caller = caller
        self.token = token


class _Decision(NamedTuple):
    """A request allowed: by which cache entry, for which method and target (as the client sent it); the
    target and head to send upstream (the judged path, the client's headers and the gateway's), the body
    limit, and whether a body is allowed at all."""

    token: CachedToken
    method: str
    target: bytes
    verdict: Verdict
    upstream_target: str
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


async def _handlers(app: web.Application) -> AsyncIterator[None]:
    """One decider for the process (one set of failure limits), used by the proxy and forward-auth alike."""
    core = app[core_key]
    settings = core.settings
    limits = FailureLimits(
        per_source=settings.failure_limit_per_source,
        per_token=settings.failure_limit_per_token,
        window=settings.failure_window,
    )
    authenticator = Authenticator(core.tokens, core.hasher, prefix=settings.token_prefix, limits=limits)
    decider = Decider(settings, authenticator, core.client_ips)
    if settings.forward_auth_listen is not None:
        forward_auth: RequestHandler = ForwardAuthHandler(core, decider)
        app[forward_auth_handler_key] = forward_auth
        if settings.upstream is None:
            app[http_handler_key] = forward_auth  # forward-auth alone: no proxy port is opened
            yield
            return
    upstream = settings.require_upstream()
    pool = open_upstream_pool(
        upstream, connect_timeout=settings.upstream_connect_timeout, read_timeout=settings.upstream_timeout
    )
    forwarder = app[forwarder_key] = UpstreamForwarder(pool, upstream, body_timeout=settings.client_body_timeout)
    core.metrics.gauges["upstream_connections"] = lambda: pool.open_count
    tunnels = app[tunnels_key] = TunnelRegistry(
        upstream,
        max_tunnels=settings.websocket_max_tunnels,
        max_per_token=settings.websocket_max_tunnels_per_token,
        idle_timeout=settings.websocket_idle_timeout,
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_timeout,
    )
    handler = ProxyHandler(core, decider, forwarder, tunnels)
    tunnels.judge = handler.still_allowed
    core.tokens.listeners.append(tunnels.token_changed)
    proxy: RequestHandler = handler
    app[http_handler_key] = proxy
    yield
    core.tokens.listeners.remove(tunnels.token_changed)
    await pool.close()


async def _close_tunnels(app: web.Application) -> None:
    """On shutdown: open tunnels get a close frame 1001 (going away) rather than holding the stop back."""
    tunnels = app.get(tunnels_key)
    if tunnels is not None:
        tunnels.close_all()


def create_proxy_app(core: Core) -> web.Application:
    """The data plane: serve it with http_server.HttpRunner (aiohttp's AppRunner would not route requests), the
    proxy on its port (when an upstream is set) and forward-auth on its own (`HandlerSite` with
    `forward_auth_handler_key`, when forward_auth_listen is set)."""
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
    app.cleanup_ctx.append(_handlers)
    app.cleanup_ctx.append(background_task("usage-writer", lambda app: app[core_key].usage.run()))
    app.cleanup_ctx.append(
        background_task("tunnel-sweep", lambda app: app[tunnels_key].run() if tunnels_key in app else None)
    )
    app.on_shutdown.append(_close_tunnels)
    if core.shared is not None:
        listener = core.shared.listener
        app.cleanup_ctx.append(background_task("token-change-listener", lambda app: listener.run()))
        if core.shared.changes.turn is not None:  # one process at a time delivers: any that is up does
            changes = core.shared.changes
            app.cleanup_ctx.append(background_task("change-delivery", lambda app: changes.run()))
    if core.store_listener is not None:
        store_listener = core.store_listener
        app.cleanup_ctx.append(background_task("store-change-listener", lambda app: store_listener.run()))
    return app
