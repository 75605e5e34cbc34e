"""A pooled HTTP/1.1 client for the one upstream, on asyncio Protocols and the httptools (llhttp) parser.

aiohttp's client cost ~250 us per proxied request here. This one does only what the proxy needs: one host,
keep-alive connections reused newest-first, bodies streamed both ways under flow control, no per-request
task. It writes the framing header (Content-Length or Transfer-Encoding) itself from the body it is given,
so a caller can never declare one length and send another down a shared connection.

Read top-down, each module importing only those below it: `pool` (the pool, and the encoding of request
heads), `connection` (one connection: writes a request, parses the answer), `response` (the head, and the
body as it arrives), `errors`.
"""

from gateway.upstream_client.connection import HOP_BY_HOP_HEADERS
from gateway.upstream_client.errors import (
    UpstreamBodyError,
    UpstreamConnectError,
    UpstreamConnectionError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
)
from gateway.upstream_client.pool import UpstreamPool
from gateway.upstream_client.response import UpstreamResponse

__all__ = [
    "HOP_BY_HOP_HEADERS",
    "UpstreamBodyError",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamResponseTooLarge",
    "UpstreamTimeout",
]
