"""A pooled HTTP/1.1 client for the one upstream, on asyncio Protocols and the httptools (llhttp) parser.

aiohttp's client cost ~250 us per proxied request here. This one does only what the proxy needs: one host,
keep-alive connections reused newest-first, bodies streamed both ways under flow control, no per-request
task. It writes the framing header (Content-Length or Transfer-Encoding) itself from the body it is given,
so a caller can never declare one length and send another down a shared connection.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl as ssl_module
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Self, cast

import httptools

Body = bytes | bytearray | memoryview | AsyncIterator[bytes] | None

# RFC 9110 section 9.2.2: only these may be sent again after a connection dies without an answer.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
# Written by the pool from `body`, `content_length` and `chunked`; refused in the caller's headers.
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})
# RFC 9110 section 7.6.1: meaningful for one connection only; a proxy never relays them (nor the headers a
# `Connection` header names).
HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Not relayed by `UpstreamResponse.relay_headers`: hop-by-hop, and the framing the relaying side writes itself.
_NOT_RELAYED = HOP_BY_HOP_HEADERS | {b"content-length"}
_NOT_RELAYED_LENGTHS = frozenset(len(name) for name in _NOT_RELAYED)

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_BLOCK = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\x00]*\r\n)*")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_IN_MEMORY = (bytes, bytearray, memoryview)
_JOIN_BELOW = 16 * 1024  # a body this small goes out in the same write as the head
_CACHE_MAX = 1024
_NORMAL, _CONNECTION, _FRAMING = 0, 1, 2


class UpstreamError(Exception):
    """Base of every failure to get a response from the upstream."""


class UpstreamConnectError(UpstreamError, ConnectionError):
    """No connection could be opened (refused, unreachable, DNS or TLS failure)."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream was silent for longer than a timeout allows."""


class UpstreamConnectTimeout(UpstreamConnectError, UpstreamTimeout):
    """Opening a connection took longer than `connect_timeout`."""


class UpstreamConnectionError(UpstreamError, ConnectionError):
    """The connection died before the response head arrived."""

    nothing_received = False  # no byte of any response arrived: the request may not have been seen


class UpstreamProtocolError(UpstreamError):
    """The upstream's answer was not valid HTTP/1.1, was unsolicited, or its head was too large."""


class UpstreamBodyError(UpstreamError, ConnectionError):
    """The response body broke off before its end."""


class UpstreamResponseTooLarge(UpstreamError):
    """`read_all` met more bytes than its limit."""


class UpstreamResponse:
    """A response whose head has arrived; the body follows through `read_chunk` or `async for`.

    The connection goes back to the pool by itself once the whole body has arrived and been handed out; a
    caller that stops early calls `close()` (or `release()`, the same), which discards an unfinished one.
    """

    __slots__ = (
        "status", "reason", "headers", "relay_headers", "has_date", "content_length", "will_close",
        "body_length_known", "max_buffered",
        "_conn", "_chunks", "_buffered", "_high_water", "_paused", "_done", "_error", "_waiter",
    )

    def __init__(
        self,
        status: int,
        reason: str,
        headers: list[tuple[bytes, bytes]],
        *,
        content_length: int | None,
        will_close: bool,
        body_length_known: bool,
        conn: _Connection | None = None,
        high_water: int = 256 * 1024,
        relay_headers: bytes = b"",
        has_date: bool = False,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # as received: names keep their case, values are raw bytes
        # For a proxy: the end-to-end headers (hop-by-hop, those named by Connection and Content-Length
        # left out) as `Name: value\r\n` lines, and whether a Date header is among them.
        self.relay_headers = relay_headers
        self.has_date = has_date
        self.content_length = content_length  # the header's value (for HEAD and 304 it describes no body)
        self.will_close = will_close
        self.body_length_known = body_length_known  # False: the body ends when the upstream closes
        self.max_buffered = 0  # the most body bytes held here at once, for tests and diagnostics
        self._conn = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._high_water = high_water
        self._paused = False
        self._done = conn is None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason}>"

    async def read_chunk(self) -> bytes:
        """Everything buffered so far (at most about 2 x 256 KB), or b"" at the end of the body."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._conn is not None:
                    if self._done:
                        self._detach(True)
                    elif self._paused:
                        self._paused = False
                        self._conn.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._done:
                self._detach(True)
                return b""
            conn = self._conn
            assert conn is not None
            waiter = self._waiter = conn.loop.create_future()
            timer = conn.loop.call_later(conn.read_timeout, conn.read_timed_out)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        data = await self.read_chunk()
        if not data:
            raise StopAsyncIteration
        return data

    def complete_body(self) -> bytes | None:
        """The whole body when it has already arrived (the usual case for a small answer), else None."""
        if not self._done or self._error is not None:
            return None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        self._detach(True)
        return data

    async def read_all(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while data := await self.read_chunk():
            size += len(data)
            if size > limit:
                self.close()
                raise UpstreamResponseTooLarge(f"the response body is larger than {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        """Abandon the response; an unfinished connection is discarded, never reused."""
        self._chunks.clear()
        self._buffered = 0
        if not self._done and self._error is None:
            self._error = UpstreamBodyError("the response was closed before its end")
        if self._conn is not None:
            self._detach(self._done)
        self._wake()  # a read waiting in another task ends now

    release = close

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # Called by the connection, inside the parser's callbacks.
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        buffered = self._buffered = self._buffered + len(data)
        if buffered > self.max_buffered:
            self.max_buffered = buffered
        if buffered > self._high_water and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._conn = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _detach(self, reuse: bool) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if self._paused:
            self._paused = False
            conn.resume_reading()
        conn.pool._finished(conn, reuse)


def _timed_out(waiter: asyncio.Future[None], message: str) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(message))


class _Connection(asyncio.Protocol):
    """One upstream connection, serving one exchange at a time (no pipelining)."""

    __slots__ = (
        "pool", "loop", "read_timeout", "transport", "parser", "closed", "reusable", "idle_since", "in_pool",
        "active", "head_waiter", "response", "awaiting_head", "informational", "received_any", "is_head",
        "head_pending", "parser_spent", "write_paused", "write_waiter", "failed",
        "m_headers", "m_reason", "m_size", "m_length", "m_te", "m_chunked", "m_close", "m_keep_alive",
        "m_relay", "m_dated", "m_listed",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool._loop
        self.read_timeout = pool._read_timeout
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reusable = True
        self.failed = False
        self.idle_since = 0.0
        self.in_pool = False
        self.active = False
        self.head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self.response: UpstreamResponse | None = None
        self.awaiting_head = False
        self.informational = False
        self.received_any = False
        self.is_head = False
        self.head_pending = 0
        self.parser_spent = False
        self.write_paused = False
        self.write_waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        self.pool._lost(self)
        if not self.active:
            return
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            error = UpstreamConnectionError("the upstream closed the connection before answering")
            error.nothing_received = not self.received_any
            waiter.set_exception(error)
        response = self.response
        if response is not None and not response._done:
            if exc is None and not response.body_length_known and not self.failed:
                response._finish()  # a body delimited by the close has ended
            else:
                response._fail(UpstreamBodyError("the upstream closed the connection mid-body"))
        self._wake_writer(UpstreamConnectionError("the upstream closed the connection"))

    def data_received(self, data: bytes) -> None:
        if not self.active:  # an idle connection has nothing to say; whatever it sent, drop it
            self.abort()
            return
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamProtocolError("the upstream switched protocols"))
            return
        except httptools.HttpParserError as error:
            cause = error.__context__
            self.fail(cause if isinstance(cause, UpstreamError) else UpstreamProtocolError(
                f"the upstream sent an invalid response: {error}"))
            return
        if self.awaiting_head:
            self.head_pending += len(data)
            if self.head_pending > self.pool._max_header_bytes:
                self.fail(self._head_too_large())

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writer(None)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if not self.awaiting_head:
            raise UpstreamProtocolError("the upstream sent a response that no request asked for")
        self.m_headers: list[tuple[bytes, bytes]] = []
        self.m_reason = b""
        self.m_size = 0
        self.m_length: int | None = None
        self.m_te = self.m_chunked = self.m_close = self.m_keep_alive = False
        self.m_relay: list[bytes] = []
        self.m_dated = self.m_listed = False

    def on_status(self, reason: bytes) -> None:
        self.m_reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.m_headers.append((name, value))
        self.m_size += len(name) + len(value) + 4
        if self.m_size > self.pool._max_header_bytes:
            raise self._head_too_large()
        size = len(name)
        if size in _NOT_RELAYED_LENGTHS and (lower := name.lower()) in _NOT_RELAYED:
            if lower == b"content-length":
                self.m_length = int(value)
            elif lower == b"transfer-encoding":
                self.m_te = True
                self.m_chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            elif lower == b"connection":
                tokens = {token.strip() for token in value.lower().split(b",")}
                self.m_close = self.m_close or b"close" in tokens
                self.m_keep_alive = self.m_keep_alive or b"keep-alive" in tokens
                self.m_listed = self.m_listed or bool(tokens - {b"close", b"keep-alive", b""})
            return
        self.m_relay += (name, b": ", value, b"\r\n")
        if size == 4 and name.lower() == b"date":
            self.m_dated = True

    def _relay_headers(self) -> bytes:
        if not self.m_listed:
            return b"".join(self.m_relay)
        listed = {
            token.strip()
            for name, value in self.m_headers
            if name.lower() == b"connection"
            for token in value.lower().split(b",")
        }
        return b"".join(
            b"%s: %s\r\n" % (name, value)
            for name, value in self.m_headers
            if (lower := name.lower()) not in _NOT_RELAYED and lower not in listed
        )

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise UpstreamProtocolError("the upstream switched protocols")
            self.informational = True  # 100 Continue, 103 Early Hints...: the real answer follows
            self.head_pending = 0
            return
        self.awaiting_head = False
        if self.is_head:  # llhttp cannot be told about HEAD: the parser is replaced after this exchange
            self.parser_spent = True
            has_body = False
            keep_alive = not self.m_close if parser.get_http_version() == "1.1" else self.m_keep_alive
        else:
            has_body = status != 204 and status != 304
            keep_alive = parser.should_keep_alive()
        if not keep_alive:
            self.reusable = False
        response = UpstreamResponse(
            status,
            self.m_reason.decode("latin-1"),
            self.m_headers,
            content_length=self.m_length,
            will_close=not self.reusable,
            body_length_known=not has_body or (self.m_chunked if self.m_te else self.m_length is not None),
            conn=self,
            high_water=self.pool._read_high_water,
            relay_headers=self._relay_headers(),
            has_date=self.m_dated,
        )
        if not has_body:
            response._done = True
        self.response = response
        assert self.head_waiter is not None
        self.head_waiter.set_result(response)
        self._wake_writer(None)  # an early answer stops an upload

    def on_body(self, data: bytes) -> None:
        response = self.response
        if response is None or response._done:  # a body where none may be (HEAD): never reuse this
            self.reusable = False
            return
        response._feed(data)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.response is not None:
            self.response._finish()

    # used by the pool and the response
    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def fail(self, error: BaseException) -> None:
        """End the exchange with `error` and drop the connection."""
        self.failed = True
        self.abort()
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        elif self.response is not None and not self.response._done:
            self.response._fail(error)
        self._wake_writer(error)

    def read_timed_out(self) -> None:
        self.fail(UpstreamTimeout(f"the upstream sent nothing for {self.read_timeout} s"))

    def _head_too_large(self) -> UpstreamProtocolError:
        return UpstreamProtocolError(f"the response head is larger than {self.pool._max_header_bytes} bytes")

    def _wake_writer(self, error: BaseException | None) -> None:
        waiter = self.write_waiter
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    async def exchange(
        self, head: bytes, body: Body, content_length: int | None, chunked: bool, is_head: bool, close: bool
    ) -> UpstreamResponse:
        if self.closed:
            error = UpstreamConnectionError("the upstream closed the connection")
            error.nothing_received = True
            raise error
        if self.parser_spent:
            self.parser = httptools.HttpResponseParser(self)
            self.parser_spent = False
        self.active = self.awaiting_head = True
        self.received_any = self.informational = False
        self.is_head = is_head
        self.head_pending = 0
        self.response = None
        if close:
            self.reusable = False
        waiter: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        self.head_waiter = waiter
        transport = self.transport
        assert transport is not None
        try:
            if body is None:
                transport.write(head)
            elif isinstance(body, _IN_MEMORY):
                if len(body) < _JOIN_BELOW:
                    transport.write(head + body)
                else:
                    transport.write(head)
                    transport.write(body)
            else:
                transport.write(head)
                await self._send_stream(body, content_length, chunked)
            if not waiter.done():
                timer = self.loop.call_later(self.read_timeout, self.read_timed_out)
                try:
                    await waiter
                finally:
                    timer.cancel()
            response = waiter.result()
        except BaseException:
            self.abort()
            if not waiter.done():
                waiter.cancel()
            elif not waiter.cancelled():
                waiter.exception()  # retrieved: the error that propagates may be another one
            raise
        if not self.reusable:  # e.g. answered before the whole upload was sent
            response.will_close = True
        return response

    async def _send_stream(self, body: AsyncIterator[bytes], content_length: int | None, chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        waiter = self.head_waiter
        assert waiter is not None
        remaining = content_length or 0
        finished = False
        try:
            async for chunk in body:
                if waiter.done() or self.closed:
                    break  # answered before the upload ended, or gone: stop sending
                if not chunk:
                    continue  # an empty chunk would end a chunked body early
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    remaining -= len(chunk)
                    if remaining < 0:
                        raise ValueError("the body is longer than content_length")
                    transport.write(chunk)
                if self.write_paused:
                    await self._drain()
            else:
                if chunked:
                    transport.write(b"0\r\n\r\n")
                elif remaining:
                    raise ValueError("the body is shorter than content_length")
                finished = True
        finally:
            if not finished:
                self.reusable = False
                aclose = getattr(body, "aclose", None)
                if aclose is not None:
                    await aclose()

    async def _drain(self) -> None:
        waiter = self.write_waiter = self.loop.create_future()
        timer = self.loop.call_later(
            self.read_timeout, _timed_out, waiter, f"the upstream read none of the body for {self.read_timeout} s"
        )
        try:
            await waiter
        finally:
            timer.cancel()
            self.write_waiter = None


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to one upstream; one per process, closed by its owner.

    A request that dies on a reused connection before any response byte arrived (the upstream closed it
    as it was being reused) is sent once more on a new connection, when its body is in memory and its
    method idempotent (or `retry_non_idempotent`); a streamed body is never sent twice.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: ssl_module.SSLContext | bool | None = None,
        server_hostname: str | None = None,
        max_idle: int = 256,
        idle_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_header_bytes: int = 64 * 1024,
        read_high_water: int = 256 * 1024,
        retry_non_idempotent: bool = False,
    ) -> None:
        self._host = host
        self._port = port
        self._ssl = ssl or None
        self._server_hostname = server_hostname if ssl else None
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_header_bytes = max_header_bytes
        self._read_high_water = read_high_water
        self._retry_non_idempotent = retry_non_idempotent
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set on first use
        self._idle: deque[_Connection] = deque()  # oldest left, newest right
        self._busy: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._methods: dict[str, bytes] = {}
        self._header_kinds: dict[str, int] = {}
        self._last_block: tuple[bytes, bool] = (b"", False)
        self.opened = 0  # connections opened so far

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | bytes,
        body: Body = None,
        *,
        content_length: int | None = None,
        chunked: bool = False,
    ) -> UpstreamResponse:
        """Send one request and return once the response head has arrived.

        `headers` are all the caller's headers, Host included, as (name, value) pairs or as a pre-encoded
        block of `Name: value\\r\\n` lines; the pool adds Content-Length (bytes body, or a streamed body with
        `content_length`) or `Transfer-Encoding: chunked` (streamed body with `chunked=True`).
        """
        if self._closed:
            raise UpstreamError("the upstream pool is closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        head, close = self._encode_head(method, target, headers, body, content_length, chunked)
        is_head = method == "HEAD"
        conn = self._pop_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, head, body, content_length, chunked, is_head, close)
            except UpstreamConnectionError as error:
                if not error.nothing_received or not isinstance(body, (*_IN_MEMORY, type(None))):
                    raise
                if not self._retry_non_idempotent and method not in IDEMPOTENT_METHODS:
                    raise
        conn = await self._connect()
        return await self._exchange(conn, head, body, content_length, chunked, is_head, close)

    async def close(self) -> None:
        """Close every connection, idle or in use; requests in flight fail."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._drop_idle()
        for conn in list(self._busy):
            conn.fail(UpstreamConnectionError("the upstream pool was closed"))
        self._busy.clear()
        await asyncio.sleep(0)  # let the transports report their closing

    async def _exchange(
        self, conn: _Connection, head: bytes, body: Body, length: int | None, chunked: bool, is_head: bool,
        close: bool,
    ) -> UpstreamResponse:
        self._busy.add(conn)
        try:
            response = await conn.exchange(head, body, length, chunked, is_head, close)
        except BaseException:
            self._finished(conn, False)
            raise
        if response._done:
            response._detach(True)
        return response

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await self._loop.create_connection(
                    self._new_connection, self._host, self._port,
                    ssl=self._ssl, server_hostname=self._server_hostname,
                )
        except TimeoutError:
            raise UpstreamConnectTimeout(
                f"connecting to {self._host}:{self._port} took more than {self._connect_timeout} s"
            ) from None
        except OSError as error:
            raise UpstreamConnectError(f"could not connect to {self._host}:{self._port}: {error}") from error
        self.opened += 1
        return conn

    def _new_connection(self) -> _Connection:
        return _Connection(self)

    def _pop_idle(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            conn.in_pool = False
            if conn.closed:
                continue
            if self._loop.time() - conn.idle_since > self._idle_timeout:
                conn.abort()  # the newest is too old, so all are
                self._drop_idle()
                return None
            return conn
        return None

    def _finished(self, conn: _Connection, reuse: bool) -> None:
        """The exchange on `conn` is over: keep the connection for the next one, or drop it."""
        self._busy.discard(conn)
        conn.active = False
        conn.response = None
        conn.head_waiter = None
        if not reuse or not conn.reusable or conn.closed or self._closed or self._max_idle <= 0:
            conn.abort()
            return
        conn.idle_since = self._loop.time()
        idle = self._idle
        if len(idle) >= self._max_idle:
            oldest = idle.popleft()
            oldest.in_pool = False
            oldest.abort()
        conn.in_pool = True
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self._idle_timeout, self._sweep)

    def _lost(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if conn.in_pool:
            conn.in_pool = False
            self._idle.remove(conn)

    def _drop_idle(self) -> None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            conn.in_pool = False
            conn.abort()

    def _sweep(self) -> None:
        self._sweeper = None
        idle = self._idle
        deadline = self._loop.time() - self._idle_timeout
        while idle and idle[0].idle_since <= deadline:
            oldest = idle.popleft()
            oldest.in_pool = False
            oldest.abort()
        if idle and not self._closed:
            delay = idle[0].idle_since - deadline
            self._sweeper = self._loop.call_later(delay, self._sweep)

    def _encode_head(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] | bytes,
        body: Body,
        content_length: int | None,
        chunked: bool,
    ) -> tuple[bytes, bool]:
        """The request line and headers, validated (ValueError) so that nothing can be injected."""
        prefix = self._methods.get(method)
        if prefix is None:
            if not _TOKEN.fullmatch(method):
                raise ValueError("invalid request method")
            prefix = method.encode("ascii") + b" "
            if len(self._methods) < _CACHE_MAX:
                self._methods[method] = prefix
        if not target or _BAD_TARGET.search(target):
            raise ValueError("the request target is empty or holds a space or control character")
        if isinstance(headers, bytes):
            if headers == self._last_block[0]:  # a block the caller reuses is checked once
                block, close = self._last_block
            else:
                block, close = self._last_block = _check_block(headers)
        else:
            block, close = self._encode_pairs(headers if isinstance(headers, list) else list(headers))

        if body is None:
            if chunked or content_length is not None:
                raise ValueError("content_length and chunked describe a body, and there is none")
            framing = b""
        elif isinstance(body, _IN_MEMORY):
            if chunked or (content_length is not None and content_length != len(body)):
                raise ValueError("an in-memory body is sent with its own length")
            framing = b"Content-Length: %d\r\n" % len(body)
        elif chunked:
            if content_length is not None:
                raise ValueError("give content_length or chunked=True, not both")
            framing = b"Transfer-Encoding: chunked\r\n"
        elif content_length is not None and content_length >= 0:
            framing = b"Content-Length: %d\r\n" % content_length
        else:
            raise ValueError("a streamed body needs content_length or chunked=True")
        return b"".join((prefix, target.encode("utf-8", "surrogateescape"), b" HTTP/1.1\r\n", block, framing,
                         b"\r\n")), close

    def _encode_pairs(self, headers: list[tuple[str, str]]) -> tuple[bytes, bool]:
        kinds = self._header_kinds
        close = False
        for name, value in headers:
            kind = kinds.get(name)
            if kind is None:
                kind = _header_kind(name)
                if len(kinds) < _CACHE_MAX:
                    kinds[name] = kind
            if kind:
                if kind == _FRAMING:
                    raise ValueError(f"the pool writes the {name} header itself")
                close = close or _says_close(value)
        count = len(headers)
        if not count:
            return b"", close
        text = "\r\n".join(map(": ".join, headers))
        if text.count("\r") != count - 1 or text.count("\n") != count - 1 or "\x00" in text:
            bad = next(name for name, value in headers if _has_control(value))
            raise ValueError(f"the value of header {bad!r} holds CR, LF or NUL")
        return (text + "\r\n").encode("utf-8", "surrogateescape"), close


def _header_kind(name: str) -> int:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid header name {name[:64]!r}")
    lower = name.lower()
    return _FRAMING if lower in FRAMING_HEADERS else _CONNECTION if lower == "connection" else _NORMAL


def _says_close(value: str) -> bool:
    return "close" in {token.strip().lower() for token in value.split(",")}


def _has_control(value: str) -> bool:
    return "\r" in value or "\n" in value or "\x00" in value


def _check_block(block: bytes) -> tuple[bytes, bool]:
    if not _HEADER_BLOCK.fullmatch(block):
        raise ValueError("the header block is not a sequence of 'Name: value' CRLF-terminated lines")
    lower = b"\n" + block.lower()
    if b"\ncontent-length:" in lower or b"\ntransfer-encoding:" in lower:
        raise ValueError("the pool writes Content-Length and Transfer-Encoding itself")
    close = False
    if b"\nconnection:" in lower:
        for line in lower.split(b"\r\n"):
            name, _, value = line.lstrip(b"\n").partition(b":")
            if name == b"connection" and b"close" in {token.strip() for token in value.split(b",")}:
                close = True
    return block, close
