"""One upstream connection as an asyncio Protocol: writes a request, parses the response with httptools.

Below the pool, above the response: the pool hands each connection its limits and two callbacks, so a
connection never reaches into the pool, and a response reaches its connection only as a `BodySource`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import cast

import httptools

from gateway.upstream_client.errors import (
    UpstreamBodyError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from gateway.upstream_client.response import UpstreamResponse

Body = bytes | bytearray | memoryview | AsyncIterator[bytes] | None

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

IN_MEMORY = (bytes, bytearray, memoryview)  # bodies sent whole: the ones that may be sent again
_JOIN_BELOW = 16 * 1024  # a body this small goes out in the same write as the head


def _timed_out(waiter: asyncio.Future[None], message: str) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(message))


def _only_chunked(headers: list[tuple[bytes, bytes]]) -> bool:
    codings = [
        coding.strip().lower()
        for name, value in headers
        if name.lower() == b"transfer-encoding"
        for coding in value.split(b",")
        if coding.strip()
    ]
    return codings == [b"chunked"]


def _without_listed(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The relayable headers when Connection names some of them (RFC 9110 section 7.6.1): those go too."""
    listed = {
        token.strip()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.lower().split(b",")
    }
    return b"".join(
        b"%s: %s\r\n" % (name, value)
        for name, value in headers
        if (lower := name.lower()) not in _NOT_RELAYED and lower not in listed
    )


class Connection(asyncio.Protocol):
    """One upstream connection, serving one exchange at a time (no pipelining).

    `on_finished(conn, reuse)` is called when an exchange is over (`release`), `on_lost(conn)` when the
    connection closed; the pool uses them to keep or drop it.
    """

    __slots__ = (
        "loop", "read_timeout", "max_header_bytes", "read_high_water", "on_finished", "on_lost",
        "transport", "parser", "closed", "reusable", "idle_since", "in_pool",
        "active", "head_waiter", "response", "awaiting_head", "informational", "received_any", "is_head",
        "head_pending", "parser_spent", "write_paused", "write_waiter", "failed",
        "fed_body", "framing_pending", "m_headers", "m_reason", "m_size", "head_deadline", "watchdog",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        read_timeout: float,
        max_header_bytes: int,
        read_high_water: int,
        on_finished: Callable[[Connection, bool], None],
        on_lost: Callable[[Connection], None],
    ) -> None:
        self.loop = loop
        self.read_timeout = read_timeout
        self.max_header_bytes = max_header_bytes
        self.read_high_water = read_high_water
        self.on_finished = on_finished
        self.on_lost = on_lost
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
        self.fed_body = False
        self.framing_pending = 0
        # When the response head must have arrived (loop time), while one is awaited; and the one timer that
        # checks it. A timer per exchange (call_later, then cancel) cost ~3 % of a proxied request: this one
        # is armed at most once per read_timeout and only moves the deadline on.
        self.head_deadline: float | None = None
        self.watchdog: asyncio.TimerHandle | None = None

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
        self.head_deadline = None
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self.on_lost(self)
        if not self.active:
            return
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            error = UpstreamConnectionError("the upstream closed the connection before answering")
            error.nothing_received = not self.received_any
            waiter.set_exception(error)
        response = self.response
        if response is not None and not response.done:
            if exc is None and not response.body_length_known and not self.failed:
                response.finish()  # a body delimited by the close has ended
            else:
                response.fail(UpstreamBodyError("the upstream closed the connection mid-body"))
        self._wake_writer(UpstreamConnectionError("the upstream closed the connection"))

    def data_received(self, data: bytes) -> None:
        if not self.active:  # an idle connection has nothing to say; whatever it sent, drop it
            self.abort()
            return
        self.received_any = True
        self.fed_body = False
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
            if self.head_pending > self.max_header_bytes:
                self.fail(self._head_too_large())
        elif self.fed_body:
            self.framing_pending = 0
        else:
            # Reads that carried no body byte hold only chunk framing or trailers, which httptools buffers
            # whole: bound them like a head, so an upstream cannot grow them without end.
            self.framing_pending += len(data)
            if self.framing_pending > self.max_header_bytes:
                self.fail(UpstreamProtocolError(
                    f"the upstream sent more than {self.max_header_bytes} bytes of chunk framing or trailers"
                ))

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

    def on_status(self, reason: bytes) -> None:
        self.m_reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # Every head (1xx ones too) and the trailers are bounded as a whole here, and per read by
        # data_received. Only a head's fields are kept (one pass in on_headers_complete reads them); trailers
        # are dropped, never relayed.
        self.m_size += len(name) + len(value) + 4
        if self.awaiting_head:
            if self.m_size > self.max_header_bytes:
                raise self._head_too_large()
            self.m_headers.append((name, value))
        elif self.m_size > self.max_header_bytes:
            raise UpstreamProtocolError(f"the response trailers are larger than {self.max_header_bytes} bytes")

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
        self.m_size = 0  # from here on, it counts the trailers
        headers = self.m_headers
        length: int | None = None
        te = chunked = close = keep_alive = listed = dated = False
        relay: list[bytes] = []
        for name, value in headers:
            name_size = len(name)
            if name_size in _NOT_RELAYED_LENGTHS and (lower := name.lower()) in _NOT_RELAYED:
                if lower == b"content-length":
                    length = int(value)
                elif lower == b"transfer-encoding":
                    te = True
                    chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
                elif lower == b"connection":
                    if value == b"keep-alive":  # what most upstreams send: no tokens to read
                        keep_alive = True
                        continue
                    tokens = {token.strip() for token in value.lower().split(b",")}
                    close = close or b"close" in tokens
                    keep_alive = keep_alive or b"keep-alive" in tokens
                    listed = listed or bool(tokens - {b"close", b"keep-alive", b""})
                continue
            relay += (name, b": ", value, b"\r\n")
            if name_size == 4 and name.lower() == b"date":
                dated = True
        if self.is_head:  # llhttp cannot be told about HEAD: the parser is replaced after this exchange
            self.parser_spent = True
            has_body = False
            keep_alive = not close if parser.get_http_version() == "1.1" else keep_alive
        else:
            has_body = status != 204 and status != 304
            keep_alive = parser.should_keep_alive()
            if te and has_body and not (chunked and _only_chunked(headers)):
                # A body still gzip- (or otherwise) coded once de-chunked could only reach the client corrupt:
                # the coding travels in Transfer-Encoding, which is hop-by-hop and not relayed.
                raise UpstreamProtocolError("the upstream used a transfer coding other than chunked")
        if not keep_alive:
            self.reusable = False
        response = UpstreamResponse(
            status,
            self.m_reason.decode("latin-1"),
            headers,
            content_length=length,
            will_close=not self.reusable,
            body_length_known=not has_body or (chunked if te else length is not None),
            conn=self,
            high_water=self.read_high_water,
            relay_headers=_without_listed(headers) if listed else b"".join(relay),
            has_date=dated,
        )
        if not has_body:
            response.done = True
        self.response = response
        assert self.head_waiter is not None
        self.head_waiter.set_result(response)
        if self.write_waiter is not None:
            self._wake_writer(None)  # an early answer stops an upload

    def on_body(self, data: bytes) -> None:
        self.fed_body = True
        response = self.response
        if response is None or response.done:  # a body where none may be (HEAD): never reuse this
            self.reusable = False
            return
        response.feed(data)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.response is not None:
            self.response.finish()

    # The pool's and the response's side (the response's as a BodySource).
    def release(self, reuse: bool) -> None:
        self.on_finished(self, reuse)

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
        elif self.response is not None and not self.response.done:
            self.response.fail(error)
        self._wake_writer(error)

    def read_timed_out(self) -> None:
        self.fail(UpstreamTimeout(f"the upstream sent nothing for {self.read_timeout} s"))

    def _watch(self) -> None:
        """The watchdog's turn: time out a head that is overdue, or wait on for the deadline that moved on."""
        self.watchdog = None
        deadline = self.head_deadline
        if deadline is None or self.closed:
            return
        if self.loop.time() >= deadline:
            self.head_deadline = None
            self.read_timed_out()
        else:
            self.watchdog = self.loop.call_at(deadline, self._watch)

    def _head_too_large(self) -> UpstreamProtocolError:
        return UpstreamProtocolError(f"the response head is larger than {self.max_header_bytes} bytes")

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
        self.head_pending = self.framing_pending = 0
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
            elif isinstance(body, IN_MEMORY):
                if len(body) < _JOIN_BELOW:
                    transport.write(head + body)
                else:
                    transport.write(head)
                    transport.write(body)
            else:
                transport.write(head)
                await self._send_stream(body, content_length, chunked)
            if not waiter.done():
                # The head's deadline, watched by the connection's one timer (_watch).
                self.head_deadline = self.loop.time() + self.read_timeout
                if self.watchdog is None:
                    self.watchdog = self.loop.call_at(self.head_deadline, self._watch)
                try:
                    await waiter
                finally:
                    self.head_deadline = None
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
