"""One pipelined connection to Redis that runs the limits script: the hot path's only Redis client.

redis-py cost about 140 us of CPU per command (its pool, its connection's locks, a pure-Python reply parser;
measured with 32 concurrent callers on the 2-core test machine), more than the gateway's own work on a
request; in a pipeline of 32 still 45 us. This connection writes
each EVALSHA as prebuilt RESP bytes, the commands of one event-loop turn in one write, and matches replies to
callers in order (Redis answers a connection's commands in the order sent): a few microseconds per request.

It speaks only what the script needs: AUTH and SELECT from the redis URL, SCRIPT LOAD, EVALSHA (EVAL when the
script is missing, as after a Redis restart), integer, bulk and array replies. A TLS URL (rediss://) is left
to redis-py (shared.py), with its cost. Any failure closes the connection, fails what is waiting, and the
next call connects again: callers see an OSError (a ConnectionError or a TimeoutError) or a ReplyError.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any


class ReplyError(Exception):
    """Redis answered a command with an error (the message is Redis's own, never a secret)."""


def command(*parts: bytes | str | int) -> bytes:
    encoded = [part if isinstance(part, bytes) else str(part).encode() for part in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in encoded)


class _Incomplete(Exception):
    pass


def _parse(buffer: bytes, start: int) -> tuple[Any, int]:
    """One RESP2 value from `buffer` at `start`: (the value, where the next begins); _Incomplete if cut."""
    end = buffer.find(b"\r\n", start)
    if end < 0:
        raise _Incomplete
    kind, line = buffer[start : start + 1], buffer[start + 1 : end]
    if kind == b":":
        return int(line), end + 2
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, end + 2
        if len(buffer) < end + 2 + size + 2:
            raise _Incomplete
        return buffer[end + 2 : end + 2 + size], end + 4 + size
    if kind == b"*":
        count = int(line)
        items, position = [], end + 2
        for _ in range(max(0, count)):
            item, position = _parse(buffer, position)
            items.append(item)
        return (items if count >= 0 else None), position
    if kind == b"+":
        return line, end + 2
    if kind == b"-":
        return ReplyError(line.decode("utf-8", "replace")), end + 2
    raise ConnectionError(f"unexpected reply from Redis: {bytes(buffer[start : start + 16])!r}")


class PipeProtocol(asyncio.Protocol):
    """The connection: commands out in one write per loop turn, replies matched to callers in order.

    One timer per connection, not one per call, bounds the wait: it fires every `timeout` seconds while
    anything waits, and a reply outstanding for longer fails the connection (a late reply would be matched to
    the next caller)."""

    def __init__(self, timeout: float = 0.5) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self._timeout = timeout
        self._answered = 0  # replies matched so far
        self._watched: int | None = None  # the reply count when the timer last looked, while any waits
        self._buffer = b""
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.waiting.append(future)
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._watched is None:
            self._watched = self._answered
            loop.call_later(self._timeout, self._watch)
        return future

    def _watch(self) -> None:
        if self.lost or not self.waiting:
            self._watched = None
        elif self._answered == self._watched:  # nothing answered for a whole `timeout`
            self.fail(TimeoutError("Redis did not answer in time"))
        else:
            self._watched = self._answered
            asyncio.get_running_loop().call_later(self._timeout, self._watch)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.lost:
            data, self._out = b"".join(self._out), []
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        position = 0
        try:
            while position < len(buffer):
                value, position = _parse(buffer, position)
                if not self.waiting:
                    raise ConnectionError("a reply from Redis that nothing asked for")
                future = self.waiting.popleft()
                self._answered += 1
                if not future.done():
                    future.set_result(value)
        except _Incomplete:
            pass
        except (ConnectionError, ValueError) as error:
            self.fail(ConnectionError(f"unreadable reply from Redis: {error}"))
            return
        self._buffer = buffer[position:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(
            ConnectionError("Redis closed the connection") if exc is None else ConnectionError(str(exc))
        )

    def fail(self, error: Exception) -> None:
        self.lost = True
        self._watched = None
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


class ScriptPipe:
    """Runs `script` on the Redis at host:port (or a unix socket `path`) with keyword options as redis-py
    holds them (`username`, `password`, `db`); every call waits at most `timeout` seconds."""

    def __init__(
        self,
        script: str,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        timeout: float = 0.5,
    ) -> None:
        self._script = script.encode()
        self.sha = hashlib.sha1(self._script).hexdigest()
        self._evalsha_head = b"$7\r\nEVALSHA\r\n$40\r\n" + self.sha.encode() + b"\r\n"
        self._address = (host, port)
        self._path = path
        self._username = username
        self._password = password
        self._db = db
        self._timeout = timeout
        self._protocol: PipeProtocol | None = None
        self._connecting: asyncio.Task[PipeProtocol] | None = None

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    async def run(self, keys: Sequence[str], arguments: Sequence[str | int]) -> Any:
        """The script's reply; ReplyError for an error reply."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._connected()
        reply = await protocol.send(self._evalsha(keys, arguments))
        if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
            reply = await self._ask(protocol, command(b"EVAL", self._script, len(keys), *keys, *arguments))
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def _ask(self, protocol: PipeProtocol, data: bytes) -> Any:
        return await protocol.send(data)

    def _evalsha(self, keys: Sequence[str], arguments: Sequence[str | int]) -> bytes:
        """`EVALSHA sha numkeys keys... arguments...` in RESP, from a prefix built once."""
        parts = [str(part).encode() for part in (*keys, *arguments)]
        return (
            b"*%d\r\n" % (3 + len(parts))
            + self._evalsha_head
            + b"$%d\r\n%d\r\n" % (len(str(len(keys))), len(keys))
            + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)
        )

    async def _connected(self) -> PipeProtocol:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> PipeProtocol:
        loop = asyncio.get_running_loop()
        if self._path is not None:
            connecting = loop.create_unix_connection(lambda: PipeProtocol(self._timeout), self._path)
        else:
            connecting = loop.create_connection(lambda: PipeProtocol(self._timeout), *self._address)
        _, protocol = await asyncio.wait_for(connecting, self._timeout)
        try:
            if self._password is not None:
                credentials = (self._username, self._password) if self._username else (self._password,)
                await self._checked(protocol, command(b"AUTH", *credentials))
            if self._db:
                await self._checked(protocol, command(b"SELECT", self._db))
            await self._checked(protocol, command(b"SCRIPT", b"LOAD", self._script))
        except BaseException:
            protocol.fail(ConnectionError("the connection to Redis was not set up"))
            raise
        self._protocol = protocol
        return protocol

    async def _checked(self, protocol: PipeProtocol, data: bytes) -> None:
        reply = await self._ask(protocol, data)
        if isinstance(reply, ReplyError):
            raise reply
