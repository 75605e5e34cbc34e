"""A response from the upstream: its head, and its body handed out as it arrives.

The bottom of the package: it knows the connection that feeds it only as a `BodySource`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, Self

from gateway.upstream_client.errors import UpstreamBodyError, UpstreamResponseTooLarge


class BodySource(Protocol):
    """What a response needs from the connection its body arrives on."""

    loop: asyncio.AbstractEventLoop
    read_timeout: float

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def read_timed_out(self) -> None:
        """The upstream was silent for `read_timeout` while a read waited: fail the exchange."""

    def release(self, reuse: bool) -> None:
        """The response is done with the connection: keep it for the next exchange (`reuse`) or drop it."""


class UpstreamResponse:
    """A response whose head has arrived; the body follows through `read_chunk` or `async for`.

    The connection goes back to the pool by itself once the whole body has arrived and been handed out; a
    caller that stops early calls `close()` (or `release()`, the same), which discards an unfinished one.
    The connection feeds the body through `feed`, `finish` and `fail`; `done` says that all of it arrived.
    """

    __slots__ = (
        "status", "reason", "headers", "relay_headers", "has_date", "content_length", "will_close",
        "body_length_known", "max_buffered", "done",
        "_conn", "_chunks", "_buffered", "_high_water", "_paused", "_error", "_waiter",
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
        conn: BodySource | None = None,
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
        self.done = conn is None  # the whole body has arrived (it may not all be handed out yet)
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
                    if self.done:
                        self.detach(True)
                    elif self._paused:
                        self._paused = False
                        self._conn.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self.done:
                self.detach(True)
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
        if not self.done or self._error is not None:
            return None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        self.detach(True)
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
        if not self.done and self._error is None:
            self._error = UpstreamBodyError("the response was closed before its end")
        if self._conn is not None:
            self.detach(self.done)
        self._wake()  # a read waiting in another task ends now

    release = close

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # The connection's side, called inside the parser's callbacks.
    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        buffered = self._buffered = self._buffered + len(data)
        if buffered > self.max_buffered:
            self.max_buffered = buffered
        if buffered > self._high_water and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause_reading()
        if self._waiter is not None:  # a reader waits (a streamed body); a small one is taken whole later
            self._wake()

    def finish(self) -> None:
        self.done = True
        if self._waiter is not None:
            self._wake()

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._conn = None
        self._wake()

    def detach(self, reuse: bool) -> None:
        """Let go of the connection: back to the pool for the next exchange (`reuse`) or dropped."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if self._paused:
            self._paused = False
            conn.resume_reading()
        conn.release(reuse)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
