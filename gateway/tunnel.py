"""WebSocket upgrades through the proxy: the upgrade request on its own upstream connection, then a byte tunnel.

An upgrade request is judged like any other (proxy_app.py). It is then sent on a new upstream connection, never
a pooled one (after a 101 the connection carries another protocol and is never reused). The upstream's 101 goes
to the client and the two sockets relay bytes both ways: each side stops being read while the other side's
write buffer is full, and a tunnel that carries nothing for `idle_timeout` seconds is closed. Any other answer
is relayed as a normal response and the client connection closes after it.

Every open tunnel is registered under its token id, so a token change reaches it: `TunnelRegistry.recheck`
judges a token's tunnels again (on a cache change, and every second for expiry) and closes those no longer
allowed, with a WebSocket close frame 1008 (policy violation) when the upstream's framing is at a frame boundary,
else a TCP close.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import urlsplit

import httptools

from gateway.http_server import HttpRequest, date_header
from gateway.problems import GatewayError
from gateway.upstream_client import HOP_BY_HOP_HEADERS

log = logging.getLogger(__name__)

# Server-to-client close frames (unmasked): 1008 policy violation (the token no longer allows the tunnel) and
# 1001 going away (the gateway is stopping).
CLOSE_POLICY_VIOLATION = b"\x88\x02\x03\xf0"
CLOSE_GOING_AWAY = b"\x88\x02\x03\xe9"
# Sent upstream by the gateway itself on an upgrade request (the client's are hop-by-hop, dropped).
UPGRADE_HEADERS = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
# A non-101 answer to an upgrade request is read whole (it is an error page, not an API response).
MAX_REFUSAL_BODY = 1024 * 1024
_NOT_RELAYED = HOP_BY_HOP_HEADERS | {b"content-length", b"date"}

Judge = Callable[["Tunnel"], Awaitable[bool]]


def _unavailable(detail: str) -> GatewayError:
    return GatewayError(502, "upstream_unavailable", detail)


class FrameBoundary:
    """Follows the WebSocket frames of one direction (headers only) to tell whether a frame of our own may be
    written now without landing inside one of the upstream's frames."""

    __slots__ = ("_head", "_remaining")

    def __init__(self) -> None:
        self._head = bytearray()
        self._remaining = 0

    @property
    def at_boundary(self) -> bool:
        return not self._head and not self._remaining

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._remaining:
                taken = min(self._remaining, len(view))
                self._remaining -= taken
                view = view[taken:]
                continue
            head = self._head
            needed = 2 if len(head) < 2 else self._head_length(head) - len(head)
            head += view[:needed]
            view = view[needed:]
            if len(head) < 2 or len(head) < self._head_length(head):
                continue
            length = head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(head[2:4], "big")
            elif length == 127:
                length = int.from_bytes(head[2:10], "big")
            self._remaining = length
            head.clear()

    @staticmethod
    def _head_length(head: bytearray) -> int:
        length = head[1] & 0x7F
        return 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if head[1] & 0x80 else 0)


class _UpstreamSide(asyncio.Protocol):
    """The upstream connection of one upgrade: parses the answer's head, then relays bytes to the tunnel."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answered: asyncio.Future[bytes] = loop.create_future()  # the bytes after a 101's head
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.tunnel: Tunnel | None = None
        self._early = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_upstream(data)
            return
        if self.answered.done():
            self._early += data  # after the 101, before the tunnel starts
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self.status == 101 and not self.answered.done():
                self.answered.set_result(data[upgrade.args[0] :])
        except httptools.HttpParserError:
            self._fail(_unavailable("The upstream's answer to the upgrade is not valid HTTP."))

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.upstream_eof()
        try:
            self._parser.feed_data(b"")  # an answer delimited by the connection's end
        except httptools.HttpParserError:
            pass
        self.on_message_complete()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
        self._fail(_unavailable("The upstream closed the connection during the upgrade."))

    def pause_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.pause_client()

    def resume_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.resume_client()

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if len(self.headers) > 200:
            self._fail(_unavailable("The upstream's answer to the upgrade has too many headers."))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        self.body += data
        if len(self.body) > MAX_REFUSAL_BODY:
            self._fail(_unavailable("The upstream's answer to the upgrade is too large."))

    def on_message_complete(self) -> None:
        if self.status == 101 or self.answered.done():
            return
        if 100 <= self.status < 200:
            self.status, self.reason, self.headers = 0, b"", []  # an interim answer: the final one follows
            return
        self.answered.set_result(b"")

    def take_early(self) -> bytes:
        early, self._early = bytes(self._early), bytearray()
        return early

    def _fail(self, error: GatewayError) -> None:
        if not self.answered.done():
            self.answered.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


class Tunnel:
    """One upgraded connection pair. `done` resolves when both sockets are closed (or closing)."""

    def __init__(self, registry: TunnelRegistry, request: HttpRequest, token_id: str, judged: object) -> None:
        self._registry = registry
        self.request = request
        self.token_id = token_id
        self.judged = judged  # what the tunnel was last allowed by (proxy_app.py's decision)
        self.loop = registry.loop
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.last_activity = self.loop.time()
        self._client: asyncio.Transport | None = None
        self._upstream: asyncio.Transport | None = None
        self._to_client = FrameBoundary()
        self._eofs = 0

    def start(self, client: asyncio.Transport, upstream: asyncio.Transport) -> None:
        self._client = client
        self._upstream = upstream

    # -- relaying ------------------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self._upstream is not None and not self._upstream.is_closing():
            self._upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self._to_client.feed(data)
        if self._client is not None and not self._client.is_closing():
            self._client.write(data)

    # The client's write buffer is full: stop reading the upstream until it drains (and the other way round).
    def pause_client(self) -> None:
        if self._client is not None and not self._client.is_closing():
            self._client.pause_reading()

    def resume_client(self) -> None:
        if self._client is not None and not self._client.is_closing():
            self._client.resume_reading()

    def pause_upstream(self) -> None:
        if self._upstream is not None and not self._upstream.is_closing():
            self._upstream.pause_reading()

    def resume_upstream(self) -> None:
        if self._upstream is not None and not self._upstream.is_closing():
            self._upstream.resume_reading()

    def client_eof(self) -> bool:
        return self._half_close(self._upstream)

    def upstream_eof(self) -> bool:
        return self._half_close(self._client)

    def _half_close(self, other: asyncio.Transport | None) -> bool:
        self._eofs += 1
        if self._eofs >= 2 or other is None or other.is_closing() or not other.can_write_eof():
            self.close()
            return False
        other.write_eof()
        return True

    # -- closing -------------------------------------------------------------------------------------------

    def close(self, frame: bytes | None = None) -> None:
        """Close both sides; `frame` (a close frame) goes to the client first if it can be written whole."""
        client, upstream = self._client, self._upstream
        if client is not None and not client.is_closing():
            if frame is not None and self._to_client.at_boundary:
                client.write(frame)
            client.close()
        if upstream is not None and not upstream.is_closing():
            upstream.close()
        if not self.done.done():
            self.done.set_result(None)

    def check_idle(self, now: float, idle_timeout: float) -> None:
        if now - self.last_activity >= idle_timeout:
            self.close()


class TunnelRegistry:
    """The process's open tunnels, by token id, with their bounds; re-judges them when tokens change."""

    def __init__(
        self,
        upstream: str,
        *,
        max_tunnels: int = 10_000,
        max_per_token: int = 100,
        idle_timeout: float = 300.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        self._secure = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._secure else 80)
        self._ssl = ssl.create_default_context() if self._secure else None
        self.max_tunnels = max_tunnels
        self.max_per_token = max_per_token
        self.idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self.loop = loop or asyncio.get_running_loop()
        self._by_token: dict[str, set[Tunnel]] = {}
        self.count = 0
        self.judge: Judge | None = None
        self._rechecking: set[str] = set()

    def tunnels_of(self, token_id: str) -> list[Tunnel]:
        return list(self._by_token.get(token_id, ()))

    def _add(self, tunnel: Tunnel) -> None:
        tunnels = self._by_token.setdefault(tunnel.token_id, set())
        if len(tunnels) >= self.max_per_token:
            raise GatewayError(
                429,
                "too_many_tunnels",
                f"This token already holds {self.max_per_token} open WebSocket connections.",
                headers={"Retry-After": "1"},
            )
        if self.count >= self.max_tunnels:
            raise GatewayError(
                503, "tunnel_capacity", "The gateway holds as many WebSocket connections as it may.",
                headers={"Retry-After": "1"},
            )
        tunnels.add(tunnel)
        self.count += 1

    def _remove(self, tunnel: Tunnel) -> None:
        tunnels = self._by_token.get(tunnel.token_id)
        if tunnels is not None and tunnel in tunnels:
            tunnels.discard(tunnel)
            self.count -= 1
            if not tunnels:
                del self._by_token[tunnel.token_id]

    async def relay(
        self,
        request: HttpRequest,
        target: str,
        head: bytes,
        token_id: str,
        judged: object,
        *,
        response_headers: bytes = b"",
    ) -> None:
        """Send the upgrade upstream as `target` (the judged path, forward.py's `upstream_target`) on a new
        connection; on its 101, tunnel until either side closes. `response_headers` (the gateway's own lines,
        such as RateLimit) go with the answer, a 101 or not."""
        if request.body is not None or (request.content_length or 0) > 0:
            raise GatewayError(400, "bad_request", "An upgrade request has no body.")
        tunnel = Tunnel(self, request, token_id, judged)
        self._add(tunnel)
        side: _UpstreamSide | None = None
        try:
            side = await self._connect()
            assert side.transport is not None
            line = b"GET %s HTTP/1.1\r\n" % target.encode("utf-8", "surrogateescape")
            side.transport.write(line + head + UPGRADE_HEADERS + b"\r\n")
            try:
                async with asyncio.timeout(self._read_timeout):
                    early = await side.answered
            except TimeoutError:
                raise GatewayError(504, "upstream_timeout", "The upstream service did not answer in time.") from None
            if side.status != 101:
                _relay_refusal(request, side, response_headers)
                return
            client, client_early = request.switch_protocols(
                _switch_head(side) + response_headers, tunnel.from_client, tunnel.client_eof, tunnel.close,
                tunnel.pause_upstream, tunnel.resume_upstream,
            )
            tunnel.start(client, side.transport)
            side.tunnel = tunnel
            if client_early:
                tunnel.from_client(client_early)
            if early or (early := side.take_early()):
                tunnel.from_upstream(early)
            client.resume_reading()
            await tunnel.done
        finally:
            self._remove(tunnel)
            if side is not None and side.transport is not None and not side.transport.is_closing():
                side.transport.close()
            tunnel.close()

    async def _connect(self) -> _UpstreamSide:
        side = _UpstreamSide(self.loop)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.loop.create_connection(
                    lambda: side,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._secure else None,
                )
        except (OSError, TimeoutError) as error:
            log.warning("upstream upgrade connection failed: %s", type(error).__name__)
            raise _unavailable("The upstream service could not be reached.") from None
        return side

    # -- revocation and idle tunnels -----------------------------------------------------------------------

    def token_changed(self, token_id: str | None) -> None:
        """A cache entry changed (None: all of them): judge the affected tunnels again, soon."""
        if self.judge is None or not self._by_token:
            return
        for changed in list(self._by_token) if token_id is None else [token_id]:
            if changed in self._by_token and changed not in self._rechecking:
                self._rechecking.add(changed)
                self.loop.create_task(self.recheck(changed))

    async def recheck(self, token_id: str) -> None:
        self._rechecking.add(token_id)
        try:
            judge = self.judge
            for tunnel in self.tunnels_of(token_id):
                if judge is not None and not tunnel.done.done() and not await judge(tunnel):
                    log.info("closing a WebSocket tunnel of token %s: no longer allowed", token_id)
                    tunnel.close(CLOSE_POLICY_VIOLATION)
        except Exception:
            log.exception("re-judging the tunnels of token %s failed", token_id)
        finally:
            self._rechecking.discard(token_id)

    async def run(self, interval: float = 1.0) -> None:
        """Every `interval` seconds: close idle tunnels, and judge every token's tunnels again (expiry)."""
        while True:
            await asyncio.sleep(interval)
            now = self.loop.time()
            for token_id in list(self._by_token):
                for tunnel in self.tunnels_of(token_id):
                    tunnel.check_idle(now, self.idle_timeout)
                if token_id not in self._rechecking:
                    await self.recheck(token_id)

    def close_all(self) -> None:
        for token_id in list(self._by_token):
            for tunnel in self.tunnels_of(token_id):
                tunnel.close(CLOSE_GOING_AWAY)


def _switch_head(side: _UpstreamSide) -> bytes:
    head = b"".join(
        b"%s: %s\r\n" % (name, value) for name, value in side.headers if name.lower() not in _NOT_RELAYED
    )
    return head + UPGRADE_HEADERS + date_header()


def _relay_refusal(request: HttpRequest, side: _UpstreamSide, response_headers: bytes) -> None:
    """The upstream answered the upgrade with a normal response: the client gets it as it is."""
    headers = b"".join(
        b"%s: %s\r\n" % (name, value) for name, value in side.headers if name.lower() not in _NOT_RELAYED
    ) + response_headers
    try:
        reason = side.reason or HTTPStatus(side.status).phrase.encode("ascii")
    except ValueError:
        reason = b"Unknown"
    request.keep_alive = False
    request.respond(side.status, reason, headers + date_header(), bytes(side.body))
