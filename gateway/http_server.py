"""The data plane's HTTP/1.1 server: an asyncio protocol over the httptools parser (llhttp).

aiohttp's web framework costs more per request than everything else the gateway does together (bench/PROFILE.md):
the proxy port needs one route, no middleware chain, and headers it can pass on as bytes. So each connection
is a protocol that parses with httptools, hands every request to one handler coroutine in order (pipelining
included), and writes the answer as raw bytes: a small response in one write, a large one streamed with
backpressure both ways. The aiohttp `Application` stays the plane's lifecycle (cleanup_ctx, AppKeys):
`HttpRunner` starts it and serves the port with `HttpServer` instead of aiohttp's server.

What the server enforces itself, before the handler runs: header count and line length (431), the time a
client may take to send a request head (408), idle keep-alive connections (closed), malformed requests (400),
and request smuggling (llhttp refuses Content-Length with Transfer-Encoding and duplicate lengths).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from time import perf_counter
from typing import Any, cast

import httptools
from aiohttp import web

from gateway.access_log import AccessLog, path_for_log
from gateway.metrics import Metrics
from gateway.problems import GatewayError, problem_bytes

log = logging.getLogger(__name__)

RequestHandler = Callable[["HttpRequest"], Awaitable[None]]
# What an upgraded connection's bytes and events go to (tunnel.py): data, end of input (True keeps the socket
# open half-closed), loss, and the client's write buffer filling up and draining.
TunnelCallbacks = tuple[
    Callable[[bytes], None], Callable[[], bool], Callable[[], None], Callable[[], None], Callable[[], None]
]

BODY_HIGH_WATER = 256 * 1024  # buffered request body bytes before the socket stops being read
LINGER_SECONDS = 2.0  # how long unread request bytes are drained after a final answer, so it is not reset
SWEEP_INTERVAL = 1.0
MAX_PIPELINE = 16  # parsed requests waiting on one connection before its socket stops being read
# The answering task's name. Given, so that a task made per request is not named "Task-<n>" by formatting a
# counter (1.4k instructions, ~1 % of a request); created as asyncio.Task because uvloop's create_task names
# the task before it applies `name`.
_TASK_NAME = "http-answer"


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_count: int = 100
    max_header_bytes: int = 8190  # the longest request line or header line
    header_timeout: float = 15.0  # seconds to send a whole request head, from its first byte or the connection
    keepalive_timeout: float = 75.0  # seconds an idle keep-alive connection is kept

    @property
    def max_head_bytes(self) -> int:
        return 4 * self.max_header_bytes + 4096


class _HeadTooLarge(Exception):
    pass


def _internal_error() -> GatewayError:
    return GatewayError(500, "internal_error", "The gateway failed to handle this request.")


_date_second = 0
_date_line = b""


def date_header() -> bytes:
    """`Date: ...\\r\\n` for now, formatted once per second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
    return _date_line


class RequestBody:
    """The body of one request as it arrives; `read` returns b"" at its end.

    Reading pauses the socket while more than BODY_HIGH_WATER bytes wait, and resumes it as they are taken.
    The first read answers `Expect: 100-continue`, so a client only sends its body once the request was
    accepted.
    """

    __slots__ = ("_buffered", "_chunks", "_conn", "_done", "_error", "_expect_continue", "_waiter", "received")

    def __init__(self, conn: HttpConnection, *, expect_continue: bool) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._expect_continue = expect_continue
        self.received = 0

    @property
    def complete(self) -> bool:
        return self._done

    async def read(self) -> bytes:
        if self._expect_continue:
            self._expect_continue = False
            if not self._done and not self._chunks:
                self._conn.send_continue()
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered <= BODY_HIGH_WATER:
            self._conn.body_drained()
        return chunk

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self.received += len(data)
        if self._buffered > BODY_HIGH_WATER:
            self._conn.body_backlogged()
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def discard(self) -> None:
        """Drop what the handler did not read (it answered without the body)."""
        self._chunks.clear()
        self._buffered = 0
        self._conn.body_drained()

    def fail(self, error: BaseException) -> None:
        if not self._done:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class HttpRequest:
    """One request: its head as received (header names keep their case, values are bytes) and its body.

    The handler answers through `respond` (a whole response in one write) or `start_response`, `write` and
    `finish_response` (a streamed one). Framing headers (Content-Length, Transfer-Encoding, Connection) are the
    server's: the handler passes every other header as `Name: value\\r\\n` lines.
    """

    __slots__ = (
        "_bodiless",
        "_chunked",
        "_conn",
        "_error",
        "body",
        "body_length",
        "client",
        "code",
        "connection_state",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "peer",
        "started",
        "status",
        "target",
        "token_id",
        "upgrade",
        "upstream_seconds",
        "version",
    )

    def __init__(
        self,
        conn: HttpConnection,
        method: str,
        target: bytes,
        version: str,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        body: RequestBody | None,
        content_length: int | None = None,
    ) -> None:
        self._conn = conn
        self.content_length = content_length  # the declared Content-Length; None when chunked or absent
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = body
        self.peer = conn.peer
        self.client = conn.peer  # for the access log: the handler puts the address it resolved here
        self.token_id = "-"  # for the access log, once the handler knows it
        self.code = "ok"  # the decision, for metrics: a problem's code when the gateway refused
        self.upstream_seconds = 0.0  # spent waiting for the upstream's response head, for metrics
        self.status = 0
        self.body_length = 0
        self.started = False
        self.upgrade: bytes | None = None  # the Upgrade header's value (lower case) when the parser saw one
        # Whatever the handler kept on this connection from its previous request (None at first): set when the
        # handler is called, kept on the connection for the next request once it returns.
        self.connection_state: object = None
        self._chunked = False
        self._bodiless = False
        self._error: GatewayError | None = None

    @property
    def closing(self) -> bool:
        """Whether the connection ends after this response (the client asked, or the server is stopping)."""
        return not self.keep_alive or self._conn.closing

    def respond(self, status: int, reason: bytes, headers: bytes, body: bytes) -> None:
        """The whole response in one write; for HEAD the body's length is sent and the body is not."""
        head = b"HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\n" % (status, reason, headers, len(body))
        if self.method == "HEAD":
            body = b""
        self.status = status
        self.body_length = len(body)
        self.started = True
        if self.body is None and self.keep_alive and self.version == "1.1" and not self._conn.closing:
            self._conn.write(head + b"\r\n" + body)  # the usual case, where _connection_header adds nothing
        else:
            self._conn.write(head + self._connection_header() + b"\r\n" + body)

    def start_response(
        self, status: int, reason: bytes, headers: bytes, *, content_length: int | None, bodiless: bool = False
    ) -> None:
        """Send the head of a streamed response; `bodiless` for HEAD, 1xx, 204 and 304, where `content_length`
        (if any) describes the body that is not sent."""
        head = self._status_line(status, reason) + headers
        self._bodiless = bodiless or self.method == "HEAD"
        if content_length is not None and status != 204:
            head += b"Content-Length: %d\r\n" % content_length
        elif not self._bodiless:
            if self.version == "1.1":
                head += b"Transfer-Encoding: chunked\r\n"
                self._chunked = True
            else:
                self.keep_alive = False  # an HTTP/1.0 client reads an unframed body until the connection closes
        self.status = status
        self.started = True
        self._conn.write(head + self._connection_header() + b"\r\n")

    async def write(self, chunk: bytes) -> None:
        if self._bodiless or not chunk:
            return
        self.body_length += len(chunk)
        if self._chunked:
            self._conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self._conn.write(chunk)
        await self._conn.drain()

    def finish_response(self) -> None:
        if self._chunked:
            self._conn.write(b"0\r\n\r\n")

    def switch_protocols(
        self,
        headers: bytes,
        on_data: Callable[[bytes], None],
        on_eof: Callable[[], bool],
        on_lost: Callable[[], None],
        on_pause_writing: Callable[[], None],
        on_resume_writing: Callable[[], None],
    ) -> tuple[asyncio.Transport, bytes]:
        """Answer 101 with `headers` and hand the connection over: from now on its bytes and events go to the
        callbacks. Returns the transport (still paused for reading) and the bytes the client sent early."""
        self.status = 101
        self.started = True
        self.keep_alive = False
        return self._conn.switch_protocols(
            b"HTTP/1.1 101 Switching Protocols\r\n" + headers + b"\r\n",
            (on_data, on_eof, on_lost, on_pause_writing, on_resume_writing),
        )

    def abort(self) -> None:
        """Cut the connection: the only signal left once the head is out and the body cannot be finished."""
        self.keep_alive = False
        self._conn.abort()

    def _status_line(self, status: int, reason: bytes) -> bytes:
        return b"HTTP/1.1 %d %s\r\n" % (status, reason)

    def _connection_header(self) -> bytes:
        if self.body is not None and not self.body.complete:
            self.keep_alive = False  # the unread rest of the body would be taken for the next request
        if self.closing:
            self.keep_alive = False
            return b"Connection: close\r\n"
        return b"Connection: keep-alive\r\n" if self.version == "1.0" else b""


class HttpConnection(asyncio.Protocol):
    """One client connection: parse, queue requests in order, run the handler on each, write the answers."""

    def __init__(self, server: HttpServer, handler: RequestHandler) -> None:
        self._server = server
        self._handler = handler
        self.loop = server.loop
        self._limits = server.limits
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.handler_state: object = None
        self.closing = False
        self._lost = False
        # The message being parsed.
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_started = False  # from a message's first byte until its headers are complete
        self._head_bytes = 0  # bytes of the incomplete head received after the read it began in
        self._messages = 0  # requests begun on this connection
        self._trailer_bytes = 0
        self._reading_body: RequestBody | None = None
        # Requests parsed and waiting, and the task answering them.
        self._pipeline: deque[HttpRequest] = deque()
        self._task: asyncio.Task[None] | None = None
        self._deadline: float | None = self.loop.time() + self._limits.header_timeout
        self._reading_paused = False
        self._body_backlogged = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._lingering = False
        self._upgraded = False
        self._early = b""  # bytes after an upgrade request's head, kept until the upgrade is decided
        self._tunnel: TunnelCallbacks | None = None

    # -- transport callbacks -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) and peer else None
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tunnel is not None:
            self._tunnel[2]()
        self._lost = True
        self.closing = True
        self._server.connections.discard(self)
        gone = ConnectionResetError("the client closed the connection")
        if self._reading_body is not None:
            self._reading_body.fail(gone)
        for request in self._pipeline:
            if request.body is not None:
                request.body.fail(gone)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(gone)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # nobody is left to answer: stop reading from the upstream too

    def data_received(self, data: bytes) -> None:
        if self._lingering or self._upgraded:
            if self._tunnel is not None:
                self._tunnel[0](data)
            elif self._upgraded and not self._lingering:
                self._early_bytes(data)
            return  # the rest of a refused body, or bytes after an upgrade not (yet) performed
        ongoing_head = self._messages if self._head_started else -1
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # The upgrade request is the last one parsed: the handler tunnels it (tunnel.py) or answers it as
            # plain HTTP, without its Upgrade header; either way the connection ends after it. Bytes after its
            # head are kept, unread, until then.
            self._upgraded = True
            if self._pipeline:
                request = self._pipeline[-1]
                request.keep_alive = False
                request.upgrade = _upgrade_value(request.headers)
            self._early_bytes(data[upgrade.args[0] :] if upgrade.args else b"")
            return
        except httptools.HttpParserCallbackError as error:
            if isinstance(error.__context__, _HeadTooLarge):
                self._refuse(431, "headers_too_large", str(error.__context__))
                return
            raise
        except httptools.HttpParserError as error:
            detail = str(error.args[0]) if error.args else "malformed request"
            self._refuse(400, "bad_request", f"The request is not valid HTTP/1.1: {detail}.")
            return
        if self._head_started and self._messages == ongoing_head:
            # The same head is still incomplete after a whole further read: every byte of it was head. Bound
            # what the parser holds (the read in which the head began is not counted: one read at most).
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_head_bytes:
                self._refuse(431, "headers_too_large", "The request head is too large.")
        if (  # _update_reading's own test, inline: no call on a connection that is read and not backed up
            self._reading_paused
            or self._body_backlogged
            or self._writing_paused
            or self._upgraded
            or len(self._pipeline) > MAX_PIPELINE
        ):
            self._update_reading()

    def eof_received(self) -> bool | None:
        """The client stopped sending: answer every complete request it sent (it may still read), in order,
        then close after the last one (the only answer that says so)."""
        if self._tunnel is not None:
            return self._tunnel[1]()
        if self._reading_body is not None:
            self._reading_body.fail(
                GatewayError(400, "incomplete_body", "The connection ended before the request body did.")
            )
            self._reading_body = None
        self._head_started = False  # an unfinished head is never answered: nothing lingers for its rest
        if self._pipeline:
            self._pipeline[-1].keep_alive = False
            return True
        self.closing = True
        return None

    def pause_writing(self) -> None:
        if self._tunnel is not None:
            self._tunnel[3]()
            return
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        if self._tunnel is not None:
            self._tunnel[4]()
            return
        self._writing_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self._update_reading()

    # -- parser callbacks ----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._target = b""
        self._headers = []
        self._head_started = True
        self._head_bytes = 0
        self._messages += 1
        self._trailer_bytes = 0
        if self._task is None:
            self._deadline = self.loop.time() + self._limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self._target += url
        if len(self._target) > self._limits.max_header_bytes:
            raise _HeadTooLarge(f"The request line is longer than {self._limits.max_header_bytes} bytes.")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._limits
        if not self._head_started:
            # A trailer field after a chunked body: never a request header (they were judged already); only
            # its size is bounded.
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > limits.max_header_bytes:
                raise _HeadTooLarge(f"The request's trailer section is longer than {limits.max_header_bytes} bytes.")
            return
        headers = self._headers
        headers.append((name, value))
        if len(headers) > limits.max_header_count:
            raise _HeadTooLarge(f"The request has more than {limits.max_header_count} headers.")
        if len(name) + len(value) + 2 > limits.max_header_bytes:
            raise _HeadTooLarge(
                f"The header {name.decode('latin-1')[:64]!r} is longer than {limits.max_header_bytes} bytes."
            )

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._head_started = False
        self._head_bytes = 0
        body = None
        version = parser.get_http_version()
        has_body, length, expect, coding_ok, hosts = _read_framing(self._headers)
        if has_body:
            body = self._reading_body = RequestBody(self, expect_continue=expect and version == "1.1")
        request = HttpRequest(
            self,
            parser.get_method().decode("ascii"),
            self._target,
            version,
            self._headers,
            parser.should_keep_alive() and not self.closing,
            body,
            length,
        )
        if not coding_ok:
            request._error = GatewayError(
                501, "unsupported_transfer_coding", "Only the chunked transfer coding is supported."
            )
            request.keep_alive = False
        elif hosts != 1 and (hosts or version != "1.0"):
            # RFC 9112 3.2: exactly one Host in HTTP/1.1 (HTTP/1.0 may omit it). Two would let the gateway and
            # the upstream's routing, logging or URL building each pick a different one.
            detail = "The request has more than one Host header." if hosts else "The request has no Host header."
            request._error = GatewayError(400, "bad_request", detail)
        self._pipeline.append(request)
        if self._task is None:
            self._deadline = None
            self._task = asyncio.Task(self._answer(), loop=self.loop, name=_TASK_NAME)

    def on_body(self, data: bytes) -> None:
        if self._reading_body is not None:
            self._reading_body.feed(data)

    def on_message_complete(self) -> None:
        if self._reading_body is not None:
            self._reading_body.finish()
            self._reading_body = None

    # -- answering -----------------------------------------------------------------------------------------

    async def _answer(self) -> None:
        """Answer the queued requests in order, then wait for the next one (keep-alive) or close."""
        server = self._server
        handler = self._handler
        pipeline = self._pipeline
        request_done = server.metrics.request_done
        access_log = server.access_log
        try:
            while pipeline:
                request = pipeline[0]
                started = perf_counter()
                # The handler's outcome, inline (one coroutine less per request): an answer, or an error
                # turned into one.
                request.connection_state = self.handler_state
                try:
                    if request._error is not None:
                        raise request._error
                    await handler(request)
                    if not request.started:
                        log.error("no answer to %s %s", request.method, path_for_log(request.target))
                        raise _internal_error()
                except asyncio.CancelledError:
                    if not self._lost:
                        raise  # the server is stopping
                    request.keep_alive = False  # the client is gone: nobody to answer
                except ConnectionError:
                    request.keep_alive = False  # the client is gone, or the connection can no longer be trusted
                except GatewayError as error:
                    self._answer_problem(request, error)
                except Exception:
                    log.exception("unhandled error on %s %s", request.method, path_for_log(request.target))
                    self._answer_problem(request, _internal_error())
                pipeline.popleft()
                self.handler_state = request.connection_state
                if request.body is not None:
                    request.body.discard()
                elapsed = perf_counter() - started
                request_done(request.code, request.status, request.token_id, elapsed, request.upstream_seconds)
                if access_log is not None:
                    access_log.request(
                        request.client,
                        request.token_id,
                        request.method,
                        request.target,
                        request.status,
                        request.body_length,
                        elapsed,
                    )
                if not request.keep_alive or self._lost:
                    self._close_after_answer(request)
                    return
                if pipeline and self._writing_paused:
                    await self.drain()  # a client that pipelines without reading gets no more answers
                if (  # as in data_received
                    self._reading_paused
                    or self._body_backlogged
                    or self._writing_paused
                    or self._upgraded
                    or len(pipeline) > MAX_PIPELINE
                ):
                    self._update_reading()
        except BaseException:
            self.abort()
            raise
        finally:
            self._task = None
        if self.closing:
            self._close_after_answer(None)
        else:
            timeout = self._limits.header_timeout if self._head_started else self._limits.keepalive_timeout
            self._deadline = self.loop.time() + timeout

    def _answer_problem(self, request: HttpRequest, error: GatewayError) -> None:
        request.code = error.code
        if self._lost:
            request.keep_alive = False
        elif request.started:
            request.abort()  # the head is out: cutting the connection is the only way to say it failed
        else:
            headers = b"".join(
                b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
                for name, value in error.headers.items()
            )
            request.respond(
                error.status,
                HTTPStatus(error.status).phrase.encode("ascii"),
                b"Content-Type: application/problem+json\r\n" + date_header() + headers,
                problem_bytes(error.status, error.code, error.detail, field=error.field),
            )

    def _refuse(self, status: int, code: str, detail: str) -> None:
        """Answer a request the parser refused (after the ones queued before it), then close."""
        self.closing = True
        self._lingering = True  # nothing after a parse error can be trusted: read no more
        error = GatewayError(status, code, detail)
        if self._reading_body is not None:
            # The broken part is this request's body: its own answer says so (its handler is waiting on it).
            self._reading_body.fail(error)
            self._reading_body = None
            return
        failed = HttpRequest(self, "GET", b"", "1.1", [], False, None)
        failed._error = error
        self._pipeline.append(failed)
        if self._task is None:
            self._deadline = None
            self._task = asyncio.Task(self._answer(), loop=self.loop, name=_TASK_NAME)

    def _close_after_answer(self, request: HttpRequest | None) -> None:
        """Close once the answer is out. If the client may still be sending (an unread body), stop writing and
        drain what arrives for a moment first, so its kernel does not reset the connection before it has read
        the answer."""
        self.closing = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        unread = (request is not None and request.body is not None and not request.body.complete) or (
            self._head_started
        )
        if unread and transport.can_write_eof():
            self._lingering = True
            self._update_reading()
            transport.write_eof()
            self._deadline = self.loop.time() + LINGER_SECONDS
        else:
            transport.close()

    # -- writing and flow control --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._lost or self._transport is None:
            raise ConnectionResetError("the client closed the connection")
        self._transport.write(data)

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("the client closed the connection")
        if self._writing_paused:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def send_continue(self) -> None:
        if not self._lost and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def body_backlogged(self) -> None:
        self._body_backlogged = True
        self._update_reading()

    def body_drained(self) -> None:
        if self._body_backlogged:
            self._body_backlogged = False
            self._update_reading()

    def _update_reading(self) -> None:
        """Read the socket unless a body, the answers to write, or the queue of parsed requests is backed up."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        stop = self._body_backlogged or self._writing_paused or len(self._pipeline) > MAX_PIPELINE or self._upgraded
        if stop and not self._lingering:
            if not self._reading_paused:
                self._reading_paused = True
                transport.pause_reading()
        elif self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _early_bytes(self, data: bytes) -> None:
        """Bytes after an upgrade request's head: kept for the tunnel; the socket is not read meanwhile."""
        self._early += data
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def switch_protocols(self, head: bytes, tunnel: TunnelCallbacks) -> tuple[asyncio.Transport, bytes]:
        if self._lost or self._transport is None:
            raise ConnectionResetError("the client closed the connection")
        self._transport.write(head)
        self._tunnel = tunnel
        self._reading_paused = True  # the tunnel resumes reading once both sides are connected
        self._transport.pause_reading()
        early, self._early = self._early, b""
        return self._transport, early

    def abort(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.abort()

    # -- timeouts and shutdown -----------------------------------------------------------------------------

    def check_deadline(self, now: float) -> None:
        deadline = self._deadline
        if deadline is None or now < deadline or self._transport is None:
            return
        self._deadline = None
        if self._lingering or self._task is not None:
            self._transport.close()
        elif self._head_started:
            self._refuse(408, "client_timeout", "The request head did not arrive in time.")
        else:
            self._transport.close()  # idle: a keep-alive connection nobody used

    def close_when_idle(self) -> None:
        """Stop taking requests: close now if idle, else after the answer in progress."""
        self.closing = True
        if self._task is None and self._transport is not None:
            self._transport.close()

    @property
    def busy(self) -> bool:
        return self._task is not None


def _read_framing(headers: list[tuple[bytes, bytes]]) -> tuple[bool, int | None, bool, bool, int]:
    """Whether the request has a body, its declared Content-Length (0 for an empty body, None if absent),
    whether it asks for `100 Continue`, whether its transfer coding is one we can pass on (chunked alone: the
    body is forwarded de-chunked), and how many Host headers it has.

    llhttp has already refused conflicting framing (both headers, differing lengths, a non-numeric length)."""
    has_body = expect = False
    coding_ok = True
    length = None
    hosts = 0
    for name, value in headers:
        size = len(name)
        if size == 4 and name.lower() == b"host":
            hosts += 1
        elif size == 14 and name.lower() == b"content-length":
            length = int(value)
            has_body = length > 0
        elif size == 17 and name.lower() == b"transfer-encoding":
            has_body = True
            coding_ok = coding_ok and value.strip().lower() == b"chunked"
        elif size == 6 and name.lower() == b"expect":
            expect = value.strip().lower() == b"100-continue"
    return has_body, length, expect, coding_ok, hosts


def _upgrade_value(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if len(name) == 7 and name.lower() == b"upgrade":
            return value.strip().lower()
    return b""


class HttpServer:
    """The protocol factory for one listening port, with its connections, sweep timer and graceful stop."""

    def __init__(
        self,
        handler: RequestHandler,
        limits: HttpLimits,
        *,
        access_log: AccessLog | None = None,
        metrics: Metrics | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.access_log = access_log
        self.metrics = metrics or Metrics()
        self.metrics.gauges["client_connections"] = lambda: len(self.connections)
        self.loop = loop or asyncio.get_running_loop()
        self.connections: set[HttpConnection] = set()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def __call__(self) -> HttpConnection:
        return HttpConnection(self, self.handler)

    def serving(self, handler: RequestHandler) -> Callable[[], HttpConnection]:
        """A protocol factory for another port of the same server, whose connections run `handler`: they
        share the limits, the access log and the graceful stop."""
        return lambda: HttpConnection(self, handler)

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            try:
                conn.check_deadline(now)
            except Exception:  # one broken connection must not stop the timeouts of all the others
                log.exception("closing a connection failed")
                conn.abort()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def pre_shutdown(self) -> None:
        for conn in list(self.connections):
            conn.close_when_idle()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Wait up to `timeout` seconds for answers in progress, then cut what is left."""
        try:
            async with asyncio.timeout(timeout):
                while any(conn.busy for conn in self.connections):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pass
        self._sweeper.cancel()
        for conn in list(self.connections):
            conn.abort()
        self.connections.clear()


http_handler_key: web.AppKey[RequestHandler] = web.AppKey("http_handler")
http_limits_key = web.AppKey("http_limits", HttpLimits)
http_metrics_key = web.AppKey("http_metrics", Metrics)


class HttpRunner(web.AppRunner):
    """Runs an aiohttp Application's lifecycle (startup, cleanup_ctx, shutdown) but serves its port with
    `HttpServer` and the handler stored under `http_handler_key`. aiohttp's sites and test servers only need
    the server to be a protocol factory with `pre_shutdown` and `shutdown`, which HttpServer is."""

    async def _make_server(self) -> web.Server:
        self.app.on_startup.freeze()
        await self.app.startup()
        self.app.freeze()
        access_log = self._kwargs.get("access_log")
        server = HttpServer(
            self.app[http_handler_key],
            self.app[http_limits_key],
            access_log=access_log if isinstance(access_log, AccessLog) else None,
            metrics=self.app.get(http_metrics_key),
        )
        return server  # type: ignore[return-value]


class HandlerSite(web.TCPSite):
    """A port of an `HttpRunner` served by another handler of the same Application (forward-auth beside the
    proxy): one lifecycle, one set of connections drained on stop."""

    __slots__ = ("_handler",)

    def __init__(self, runner: HttpRunner, host: str, port: int, *, handler: RequestHandler, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._handler = handler

    async def start(self) -> None:
        self._runner._reg_site(self)
        server = self._runner.server
        assert isinstance(server, HttpServer)
        self._server = await asyncio.get_running_loop().create_server(
            server.serving(self._handler),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
