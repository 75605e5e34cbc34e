"""Forwarding an authenticated request upstream and streaming both bodies, without buffering either."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs, web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.problems import GatewayError

log = logging.getLogger(__name__)

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded. Headers named in a
# `Connection` header are dropped too.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the gateway alone: whatever a client sends under these names is dropped.
GATEWAY_HEADER_PREFIX = "x-gateway-"
TOKEN_ID_HEADER = "X-Gateway-Token-Id"
ACCESS_LEVEL_HEADER = "X-Gateway-Access-Level"
# Dropped from the client's request: the credential, the Host we replace, and forwarding claims that we
# rewrite ourselves (or believe only from a trusted proxy).
REQUEST_HEADERS_DROPPED = frozenset(
    {"authorization", "host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
)
UNTRUSTED_FORWARDING_HEADERS = frozenset({"forwarded", "x-real-ip"})
CHUNK_SIZE = 64 * 1024


def _is_utf8(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _connection_listed(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    listed = headers.getall(hdrs.CONNECTION, ())
    return frozenset(name.strip().lower() for value in listed for name in value.split(","))


def upstream_request_headers(
    request: web.Request,
    *,
    token_id: str,
    access_level: str,
    peer_trusted: bool,
) -> CIMultiDict[str]:
    incoming = request.headers
    dropped = HOP_BY_HOP_HEADERS | REQUEST_HEADERS_DROPPED | _connection_listed(incoming)
    if not peer_trusted:
        dropped |= UNTRUSTED_FORWARDING_HEADERS
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in dropped or lower.startswith(GATEWAY_HEADER_PREFIX):
            continue
        if not value.isascii() and not _is_utf8(value):
            # aiohttp hands undecodable bytes over as lone surrogates, which its client would drop or fail on:
            # refuse rather than forward an altered value.
            raise GatewayError(400, "invalid_header_value", f"The {name} header holds bytes that are not UTF-8.")
        headers.add(name, value)

    peer = request.remote or ""
    chain = [hop.strip() for value in incoming.getall(hdrs.X_FORWARDED_FOR, ()) for hop in value.split(",")]
    forwarded_for = [hop for hop in chain if hop] if peer_trusted else []
    headers[hdrs.X_FORWARDED_FOR] = ", ".join([*forwarded_for, peer]) if peer else ", ".join(forwarded_for)
    proto = incoming.get(hdrs.X_FORWARDED_PROTO) if peer_trusted else None
    headers[hdrs.X_FORWARDED_PROTO] = proto or request.scheme
    host = incoming.get(hdrs.X_FORWARDED_HOST) if peer_trusted else None
    if host or request.host:
        headers[hdrs.X_FORWARDED_HOST] = host or request.host
    headers[TOKEN_ID_HEADER] = token_id
    headers[ACCESS_LEVEL_HEADER] = access_level
    return headers


def _response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    dropped = HOP_BY_HOP_HEADERS | _connection_listed(upstream.headers)
    return CIMultiDict((name, value) for name, value in upstream.headers.items() if name.lower() not in dropped)


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(413, "body_too_large", f"The request body is larger than this token's limit of {limit} bytes.")


class _BodyGuard:
    """Streams the client's body upstream, refusing more than `limit` bytes and a client that stalls."""

    def __init__(self, content: StreamReader, *, limit: int, timeout: float) -> None:
        self._content = content
        self._limit = limit
        self._timeout = timeout
        self.error: GatewayError | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        received = 0
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    chunk = await self._content.readany()
            except TimeoutError:
                self.error = GatewayError(408, "client_timeout", "The request body stopped arriving.")
                raise
            if not chunk:
                return
            received += len(chunk)
            if received > self._limit:
                self.error = body_too_large(self._limit)
                raise self.error
            yield chunk


class UpstreamForwarder:
    """One pooled client session per process (no cookie jar: callers must never share cookies)."""

    def __init__(self, session: aiohttp.ClientSession, upstream: str, *, body_timeout: float = 60.0) -> None:
        self._session = session
        self._upstream = upstream
        self._body_timeout = body_timeout

    def target(self, raw_path: str) -> URL:
        # The raw path and query go upstream exactly as the client sent them.
        return URL(self._upstream + raw_path, encoded=True)

    async def forward(
        self, request: web.Request, headers: CIMultiDict[str], *, max_body: int
    ) -> web.StreamResponse:
        guard = _BodyGuard(request.content, limit=max_body, timeout=self._body_timeout)
        body = guard.chunks() if request.body_exists else None
        try:
            upstream = await self._session.request(
                request.method,
                self.target(request.raw_path),
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
                chunked=None,
                skip_auto_headers=(hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE),
            )
        except Exception as error:
            if guard.error is not None:  # the client's body was refused while it streamed upstream
                raise guard.error from None
            if isinstance(error, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
                raise GatewayError(504, "upstream_timeout", "The upstream service did not answer in time.") from None
            if not isinstance(error, aiohttp.ClientError):
                raise
            log.warning("upstream request failed: %s", type(error).__name__)
            raise GatewayError(502, "upstream_unavailable", "The upstream service could not be reached.") from None

        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(_response_headers(upstream))
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_chunked(CHUNK_SIZE):
                    await response.write(chunk)
            except (TimeoutError, aiohttp.ClientError) as error:
                # Headers are out: all we can do is cut the connection so the client sees a broken body.
                log.warning("upstream response broke off mid-body: %s", type(error).__name__)
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
            return response
