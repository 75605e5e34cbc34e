"""Forwarding an authenticated request upstream and streaming both bodies, without buffering either.

The request head is built as bytes straight from the client's raw headers (hop-by-hop, credential and
gateway-owned headers dropped, forwarding headers rewritten) and sent on a pooled keep-alive connection
(upstream_client.py). A small response with a known length is answered in one write; anything else is
streamed back with backpressure both ways.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from http import HTTPStatus
from time import perf_counter
from urllib.parse import unquote_to_bytes, urlsplit

from gateway.client_ip import ClientAddress, parse_forwarded_hop
from gateway.http_server import HttpRequest, RequestBody, date_header
from gateway.outage import OutageLog
from gateway.problems import GatewayError
from gateway.request_target import RequestTarget
from gateway.upstream_client import (
    HOP_BY_HOP_HEADERS,
    UpstreamConnectError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)

# Header names are compared folded: lower case, and every character other than a letter or a digit read as
# `-`. WSGI and CGI turn `-` and `_` into the same environ key (HTTP_X_GATEWAY_TOKEN_ID), so on a server that
# passes underscore names on (wsgiref, gunicorn before 22, CGI and PHP behind some servers) `X_Forwarded_For`
# or `X_Gateway_Token_Id` would otherwise reach the application as the header we drop or own.
HEADER_NAME_FOLD = bytes.maketrans(
    bytes(range(256)),
    bytes(
        byte + 32 if 65 <= byte <= 90 else byte if 48 <= byte <= 57 or 97 <= byte <= 122 else 45
        for byte in range(256)
    ),
)
# Set by the gateway alone: whatever a client sends under these names is dropped.
GATEWAY_HEADER_PREFIX = b"x-gateway-"
# Hop-by-hop headers (upstream_client.HOP_BY_HOP_HEADERS) and those named in a `Connection` header are
# never forwarded. Content-Length and Transfer-Encoding are framing: the upstream client writes its own, from
# the body it actually sends. `Expect: 100-continue` is answered by the gateway itself (http_server.py).
FRAMING_HEADERS = frozenset({b"host", b"content-length", b"expect"})
# The forwarding headers the gateway writes itself; the values a trusted proxy sent are kept in them.
FORWARDING_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# Headers upstream frameworks read as the request's method (Symfony, Laravel, Express method-override,
# ASP.NET, Spring's HiddenHttpMethodFilter alternatives): the gateway judges the request line's method only.
METHOD_OVERRIDE_HEADERS = frozenset({b"x-http-method-override", b"x-http-method", b"x-method-override"})
# The same overrides as query parameters (Symfony, Laravel, CakePHP and Express method-override read `_method`
# from the query string), folded like header names after percent-decoding: refused, never forwarded.
METHOD_OVERRIDE_PARAMETERS = METHOD_OVERRIDE_HEADERS | {b"-method", b"-httpmethod"}
# The methods a POST body's `_method` could name that an access level is most likely to withhold: where an
# upstream may take the method from the body (setting body_method_override), a POST with a body must be
# allowed as each of them too.
BODY_OVERRIDE_METHODS = ("PUT", "PATCH", "DELETE")
# Headers IIS, Symfony, Zend/Laminas, nginx auth subrequests and Traefik read as the request's path, and those
# a WSGI server or middleware reads as the application's mount point, routing only the path after it (gunicorn
# takes `SCRIPT_NAME` from a header, trusted from 127.0.0.1 by default; Flask's well-known ReverseProxied recipe
# takes `X-Script-Name`): the gateway judges the request target only.
PATH_OVERRIDE_HEADERS = frozenset(
    {
        b"x-original-url", b"x-rewrite-url", b"x-original-uri", b"x-forwarded-uri", b"x-forwarded-path",
        b"script-name", b"path-info", b"x-script-name",
    }
)
# Headers upstream libraries read as the client address (request-ip, Express/Django/Rails helpers, CDNs). The
# gateway judges X-Forwarded-For alone (from trusted proxies) and forwards the chain it judged; any other
# claim, even relayed by a trusted proxy that passes unknown headers on, would be an address nobody checked.
CLIENT_ADDRESS_HEADERS = frozenset(
    {
        b"forwarded", b"x-real-ip", b"x-client-ip", b"client-ip", b"true-client-ip", b"cf-connecting-ip",
        b"cf-connecting-ipv6", b"cf-pseudo-ipv4", b"x-cluster-client-ip", b"forwarded-for", b"x-forwarded",
        b"x-original-forwarded-for", b"fastly-client-ip", b"x-proxyuser-ip", b"x-appengine-user-ip",
        b"akamai-client-ip", b"x-azure-clientip", b"x-azure-socketip", b"x-envoy-external-address",
        b"x-remote-ip", b"x-remote-addr", b"x-originating-ip",
    }
)
# Everything dropped from the client's request (folded names): hop-by-hop, the credential, framing and the
# Host we replace, and every header an upstream could read as a method, path or client address we did not
# judge. Forwarding headers are rewritten (believed only from a trusted proxy).
REQUEST_HEADERS_DROPPED = (
    HOP_BY_HOP_HEADERS
    | FRAMING_HEADERS
    | FORWARDING_HEADERS
    | METHOD_OVERRIDE_HEADERS
    | PATH_OVERRIDE_HEADERS
    | CLIENT_ADDRESS_HEADERS
    | {b"authorization"}
)
SMALL_BODY = 64 * 1024
BODILESS_STATUSES = frozenset({204, 304})


def _connection_listed(values: list[bytes]) -> frozenset[bytes]:
    """Header names a `Connection` header lists (other than close and keep-alive): hop-by-hop, dropped."""
    listed = {token.strip().translate(HEADER_NAME_FOLD) for value in values for token in value.split(b",")}
    return frozenset(listed - {b"", b"close", b"keep-alive"})


def upstream_request_head(
    request: HttpRequest,
    *,
    host: bytes,
    peer_trusted: bool,
    proto: bytes = b"http",
    client: ClientAddress | None = None,
) -> bytes:
    """The client's headers as sent upstream, as `Name: value\\r\\n` lines: REQUEST_HEADERS_DROPPED and
    gateway-owned names dropped (compared folded), forwarding headers rewritten (`proto`: the scheme the client
    reached the gateway with; `client`: the address judged). The upstream client adds framing; the caller adds
    `gateway_headers`."""
    lines, connection = _forwarded_lines(request, host, REQUEST_HEADERS_DROPPED, peer_trusted, proto, client)
    if connection and (listed := _connection_listed(connection)):
        lines, _ = _forwarded_lines(request, host, REQUEST_HEADERS_DROPPED | listed, peer_trusted, proto, client)
    return b"".join(lines)


def judged_chain(hops: list[bytes], client: ClientAddress | None) -> list[bytes]:
    """The X-Forwarded-For hops from the judged client rightwards. Hops left of it were written by the client
    itself: an upstream that reads the leftmost hop (Express `req.ips[0]`, request-ip) would otherwise take an
    address nobody checked for the client's. No judged client (an unreadable hop): none of them."""
    if client is None:
        return []
    for index in range(len(hops) - 1, -1, -1):
        if parse_forwarded_hop(hops[index].decode("latin-1")) == client:
            return hops[index:]
    return []


def refuse_method_override(target: bytes) -> None:
    """A 400 for a query string that names a method override (`?_method=DELETE`): the upstream would run
    another method than the one judged."""
    query = target.partition(b"?")[2]
    if not query or (b"%" not in query and b"ethod" not in query.lower()):
        return
    for parameter in query.replace(b";", b"&").split(b"&"):
        key = unquote_to_bytes(parameter.partition(b"=")[0].replace(b"+", b" "))
        if key.translate(HEADER_NAME_FOLD) in METHOD_OVERRIDE_PARAMETERS:
            raise GatewayError(
                400,
                "method_override",
                "The query string names a method override (such as _method); send the method itself.",
            )


def gateway_headers(token_id: str, access_level: str) -> bytes:
    """What the gateway tells the upstream about the caller (clients can never set these names)."""
    return b"X-Gateway-Token-Id: %s\r\nX-Gateway-Access-Level: %s\r\n" % (token_id.encode(), access_level.encode())


def _forwarded_lines(
    request: HttpRequest,
    host: bytes,
    dropped: frozenset[bytes],
    peer_trusted: bool,
    proto: bytes,
    client: ClientAddress | None,
) -> tuple[list[bytes], list[bytes]]:
    """The client's headers minus `dropped`, forwarding headers rewritten; and the Connection values seen."""
    lines = [b"Host: ", host, b"\r\n"]
    connection: list[bytes] = []
    forwarded_for: list[bytes] = []
    forwarded_proto = forwarded_host = client_host = b""
    for name, value in request.headers:
        folded = name.translate(HEADER_NAME_FOLD)
        if folded in dropped or folded.startswith(GATEWAY_HEADER_PREFIX):
            lower = name.lower()  # the exact names only: `X_Forwarded_For` is dropped, never believed
            if lower == b"host":
                client_host = value
            elif lower == b"connection":
                connection.append(value)
            elif peer_trusted:
                if lower == b"x-forwarded-for":
                    forwarded_for += [hop.strip() for hop in value.split(b",") if hop.strip()]
                elif lower == b"x-forwarded-proto":
                    forwarded_proto = value
                elif lower == b"x-forwarded-host":
                    forwarded_host = value
            continue
        lines += (name, b": ", value, b"\r\n")
    if forwarded_for:
        forwarded_for = judged_chain(forwarded_for, client)
    if request.peer:
        forwarded_for.append(request.peer.encode())
    if forwarded_for:
        lines += (b"X-Forwarded-For: ", b", ".join(forwarded_for), b"\r\n")
    lines += (b"X-Forwarded-Proto: ", forwarded_proto or proto, b"\r\n")
    if forwarded_host or client_host:
        lines += (b"X-Forwarded-Host: ", forwarded_host or client_host, b"\r\n")
    return lines, connection


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(413, "body_too_large", f"The request body is larger than this token's limit of {limit} bytes.")


class _BodyGuard:
    """Streams the client's body upstream, refusing more than `limit` bytes and a client that stalls."""

    def __init__(self, content: RequestBody, *, limit: int, timeout: float) -> None:
        self._content = content
        self._limit = limit
        self._timeout = timeout
        self.error: GatewayError | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        received = 0
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    chunk = await self._content.read()
            except TimeoutError:
                self.error = GatewayError(408, "client_timeout", "The request body stopped arriving.")
                raise self.error from None
            if not chunk:
                return
            received += len(chunk)
            if received > self._limit:
                self.error = body_too_large(self._limit)
                raise self.error
            yield chunk


def _response_headers(upstream: UpstreamResponse) -> bytes:
    """The upstream's end-to-end headers for the client, with a Date if it sent none."""
    return upstream.relay_headers if upstream.has_date else upstream.relay_headers + date_header()


def _reason(upstream: UpstreamResponse) -> bytes:
    if upstream.reason:
        return upstream.reason.encode("latin-1", "replace")
    try:
        return HTTPStatus(upstream.status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


def open_upstream_pool(upstream: str, *, connect_timeout: float, read_timeout: float) -> UpstreamPool:
    parts = urlsplit(upstream)
    secure = parts.scheme == "https"
    return UpstreamPool(
        parts.hostname or "",
        parts.port or (443 if secure else 80),
        ssl=ssl.create_default_context() if secure else None,
        server_hostname=parts.hostname if secure else None,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )


class UpstreamForwarder:
    """Sends requests on the process's one upstream pool (no cookie jar, no shared state between callers)."""

    def __init__(self, pool: UpstreamPool, upstream: str, *, body_timeout: float = 60.0) -> None:
        parts = urlsplit(upstream)
        self._pool = pool
        self._base_path = parts.path.rstrip("/")
        self.host = parts.netloc.rpartition("@")[2].encode("idna")
        self._body_timeout = body_timeout
        self.outage = OutageLog(log, f"upstream {upstream}")

    def upstream_target(self, target: RequestTarget) -> str:
        """The target sent upstream: the judged (canonical) path under the upstream URL's base path, and the
        query as the client sent it. A canonical path has no dot segment, so it never leaves the base path."""
        return self._base_path + target.path + target.query

    async def forward(
        self, request: HttpRequest, target: str, head: bytes, *, max_body: int, response_headers: bytes = b""
    ) -> None:
        """Send `request` upstream as `target` (from `upstream_target`) with `head`, and relay the answer, with
        `response_headers` (the gateway's own lines, such as RateLimit) added to it."""
        guard: _BodyGuard | None = None
        body: AsyncIterator[bytes] | bytes | None = None
        if request.body is not None:
            guard = _BodyGuard(request.body, limit=max_body, timeout=self._body_timeout)
            body = guard.chunks()
        elif request.content_length == 0:
            body = b""  # sent as `Content-Length: 0`: some upstreams answer a POST without it with 411
        length = request.content_length if guard is not None else None
        started = perf_counter()
        try:
            upstream = await self._pool.request(
                request.method,
                target,
                head,
                body,
                content_length=length,
                chunked=guard is not None and length is None,
            )
        except GatewayError:
            raise  # the client's body was refused while it streamed upstream
        except Exception as error:
            request.upstream_seconds = perf_counter() - started
            if guard is not None and guard.error is not None:
                raise guard.error from None
            if isinstance(error, ConnectionResetError) and not isinstance(error, UpstreamError):
                raise  # the client went away mid-body
            if isinstance(error, UpstreamTimeout) and not isinstance(error, UpstreamConnectError):
                raise GatewayError(504, "upstream_timeout", "The upstream service did not answer in time.") from None
            if isinstance(error, (UpstreamConnectError, UpstreamConnectionError, UpstreamError, OSError)):
                self.outage.failed(error, "answering 502 upstream_unavailable until it answers")
                raise GatewayError(
                    502, "upstream_unavailable", "The upstream service could not be reached."
                ) from None
            raise
        request.upstream_seconds = perf_counter() - started
        if self.outage.down:
            self.outage.recovered()
        length = upstream.content_length
        if (
            length is not None
            and length <= SMALL_BODY
            and request.method != "HEAD"
            and upstream.status not in BODILESS_STATUSES
        ):
            arrived = upstream.complete_body()  # a small answer has usually arrived with its head
            if arrived is not None:
                # _response_headers and _reason inline: this is every small answer's path.
                headers = upstream.relay_headers if upstream.has_date else upstream.relay_headers + date_header()
                reason = upstream.reason.encode("latin-1", "replace") if upstream.reason else _reason(upstream)
                request.respond(upstream.status, reason, headers + response_headers, arrived)
                return
        try:
            await self._respond(request, upstream, response_headers)
        finally:
            upstream.close()  # returns a fully read connection to the pool; discards a half-read one

    async def _respond(self, request: HttpRequest, upstream: UpstreamResponse, extra: bytes) -> None:
        headers = _response_headers(upstream) + extra
        status = upstream.status
        length = upstream.content_length
        bodiless = request.method == "HEAD" or status in BODILESS_STATUSES
        if not bodiless and length is not None and length <= SMALL_BODY:
            try:
                body = await upstream.read_all(SMALL_BODY)
            except (UpstreamError, OSError) as error:
                self.outage.failed(error, "its response broke off (502)")
                raise GatewayError(502, "upstream_unavailable", "The upstream response broke off.") from None
            request.respond(status, _reason(upstream), headers, body)
            return

        request.start_response(status, _reason(upstream), headers, content_length=length, bodiless=bodiless)
        if bodiless:
            return
        try:
            while chunk := await upstream.read_chunk():
                await request.write(chunk)
        except (UpstreamError, OSError) as error:
            if isinstance(error, ConnectionResetError) and not isinstance(error, UpstreamError):
                raise  # the client went away; the upstream connection is discarded
            # Headers are out: all we can do is cut the connection so the client sees a broken body.
            self.outage.failed(error, "its response broke off mid-body (the client's connection is cut)")
            request.abort()
            return
        request.finish_response()
