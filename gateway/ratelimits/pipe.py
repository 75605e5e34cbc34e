"""One pipelined connection to Redis that runs the limits script: the hot path's only Redis client.

redis-py cost about 140 us of CPU per command (its pool, its connection's locks, a pure-Python reply parser;
measured with 32 concurrent callers on the 2-core test machine), more than the gateway's own work on a
request; in a pipeline of 32 still 45 us. This connection gathers the calls of one event-loop turn into ONE
EVALSHA, written from prebuilt RESP bytes: the script (shared.py) loops over the calls in the order they came
and answers each with one line of a single bulk reply. The gateway then parses one reply and Redis runs one
script per turn, not one per request; each call is still decided alone and atomically (Redis runs the whole
script at once), so the counts are those of one EVALSHA per call.

It speaks only what the script needs: AUTH and SELECT from the redis URL, SCRIPT LOAD, EVALSHA (EVAL when the
script is missing, as after a Redis restart), integer, bulk and array replies. A TLS URL (rediss://) is left
to redis-py (shared.py), with its cost. Any failure closes the connection, fails what is waiting, and the
next call connects again: callers see an OSError (a ConnectionError or a TimeoutError) or a ReplyError.

A batch goes out at the end of the turn its first call came in, unless one is still waiting for its reply:
the calls then gather until it comes back, and go out together (at most one batch in flight, as Nagle's
algorithm holds small segments while one is unacknowledged). Idle, a call waits one round trip, as before;
under load a batch carries every call of a round trip, so Redis runs one script per round trip however many
requests come in, and the gateway writes and reads one message for them. Each call waits at most two round
trips.

One batch holds keys of many tokens. On a Redis Cluster a script's keys must share one hash slot, so a call
names its slot (`group`) and the turn's calls are batched per slot (cluster_pipes.py); one Redis has one.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any, Protocol


# Calls per EVALSHA at most: Redis runs a script alone, so a batch holds every other client up while it runs
# (about 2 µs a call).
MAX_BATCH = 500


class ReplyError(Exception):
    """Redis answered a command with an error (the message is Redis's own, never a secret)."""


def bulk(part: bytes) -> bytes:
    """One RESP bulk string: how a key or an argument of a call is handed to `ScriptPipe.call`."""
    return b"$%d\r\n%s\r\n" % (len(part), part)


def command(*parts: bytes | str | int) -> bytes:
    encoded = [part if isinstance(part, bytes) else str(part).encode() for part in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(bulk(part) for part in encoded)


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


class Waiter(Protocol):
    """Whoever waits for one reply on the connection."""

    def answered(self, value: Any) -> None: ...

    def failed(self, error: Exception) -> None: ...


class _Call:
    """One command's caller (AUTH, SELECT, SCRIPT LOAD): its reply as is, a ReplyError included."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future

    def answered(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def failed(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class PipeProtocol(asyncio.Protocol):
    """The connection: commands written as they come (the batching is ScriptPipe's), replies matched to
    waiters in order.

    One timer per connection, not one per call, bounds the wait: it fires every `timeout` seconds while
    anything waits, and a reply outstanding for longer fails the connection (a late reply would be matched to
    the next caller)."""

    def __init__(self, timeout: float = 0.5) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[Waiter] = deque()
        self._timeout = timeout
        self._answered = 0  # replies matched so far
        self._watched: int | None = None  # the reply count when the timer last looked, while any waits
        self._buffer = b""
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, waiter: Waiter) -> None:
        if self.lost or self.transport is None:
            waiter.failed(ConnectionError("the connection to Redis is closed"))
            return
        self.waiting.append(waiter)
        self.transport.write(data)
        if self._watched is None:
            self._watched = self._answered
            asyncio.get_running_loop().call_later(self._timeout, self._watch)

    def ask(self, data: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.send(data, _Call(future))
        return future

    def _watch(self) -> None:
        if self.lost or not self.waiting:
            self._watched = None
        elif self._answered == self._watched:  # nothing answered for a whole `timeout`
            self.fail(TimeoutError("Redis did not answer in time"))
        else:
            self._watched = self._answered
            asyncio.get_running_loop().call_later(self._timeout, self._watch)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        position = 0
        try:
            while position < len(buffer):
                value, position = _parse(buffer, position)
                if not self.waiting:
                    raise ConnectionError("a reply from Redis that nothing asked for")
                self._answered += 1
                self.waiting.popleft().answered(value)
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
            self.waiting.popleft().failed(error)
        if self.transport is not None:
            self.transport.abort()


class _Batch:
    """The calls gathered for one EVALSHA: their RESP keys and arguments, and one future per call (a caller
    whose request is cancelled cancels its own future, never its neighbours')."""

    __slots__ = ("pipe", "keys", "arguments", "callers", "retried")

    def __init__(self, pipe: ScriptPipe) -> None:
        self.pipe = pipe
        self.keys: list[bytes] = []
        self.arguments: list[bytes] = []
        self.callers: list[asyncio.Future[bytes]] = []
        self.retried = False

    def answered(self, value: Any) -> None:
        if isinstance(value, ReplyError) and str(value).startswith("NOSCRIPT") and not self.retried:
            self.retried = True
            self.pipe.resend(self)
            return
        if isinstance(value, ReplyError):
            self.failed(value)
            return
        lines = value.split(b"\n") if isinstance(value, bytes) else []
        if len(lines) != len(self.callers):
            self.failed(ReplyError(f"the limits script answered {len(lines)} of {len(self.callers)} calls"))
            return
        for caller, line in zip(self.callers, lines):
            if not caller.done():
                caller.set_result(line)
        self.pipe.landed()

    def failed(self, error: Exception) -> None:
        for caller in self.callers:
            if not caller.done():
                caller.set_exception(error)
        self.pipe.landed()


class ScriptPipe:
    """Runs `script` on the Redis at host:port (or a unix socket `path`) with keyword options as redis-py
    holds them (`username`, `password`, `db`); every call waits at most `timeout` seconds.

    The script is written for batches: each call adds `keys_per_call` keys and `arguments_per_call` arguments
    (KEYS and ARGV hold the calls one after another), and it returns one bulk string, one line per call."""

    def __init__(
        self,
        script: str,
        *,
        keys_per_call: int,
        arguments_per_call: int,
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
        self._keys_per_call = keys_per_call
        self._parts_per_call = keys_per_call + arguments_per_call
        self._address = (host, port)
        self._path = path
        self._username = username
        self._password = password
        self._db = db
        self._timeout = timeout
        self._protocol: PipeProtocol | None = None
        self._connecting: asyncio.Task[PipeProtocol] | None = None
        self._batches: dict[int, _Batch] = {}  # the calls not yet sent, by group (a cluster's hash slot)
        self._in_flight = 0  # batches sent and not yet answered
        self._sending: set[asyncio.Future[None]] = set()
        self.batches_sent = 0

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    def call(self, keys: bytes, arguments: bytes, group: int = 0) -> asyncio.Future[bytes]:
        """Adds one call to this turn's batch of its `group` (calls of different groups never share an
        EVALSHA): its keys and its arguments, each already a run of bulk strings (`bulk`). The future is the
        call's line of the reply; it fails with an OSError or a ReplyError."""
        loop = asyncio.get_running_loop()
        batches = self._batches
        batch = batches.get(group)
        if batch is None:
            if not batches and not self._in_flight:
                loop.call_soon(self._send_all)  # else when the batch in flight is answered (`landed`)
            batch = batches[group] = _Batch(self)
        batch.keys.append(keys)
        batch.arguments.append(arguments)
        caller: asyncio.Future[bytes] = loop.create_future()
        batch.callers.append(caller)
        if len(batch.callers) >= MAX_BATCH:
            del batches[group]  # the turn's later calls of this group start another batch
            self._send(batch)
        return caller

    def _send_all(self) -> None:
        batches = self._batches
        if not batches:  # each was sent when it was full, or at a reply; nothing came after
            return
        self._batches = {}
        for batch in batches.values():
            self._send(batch)

    def landed(self) -> None:
        """A batch was answered, or failed: the calls that gathered meanwhile go out once none is in flight."""
        self._in_flight -= 1
        if not self._in_flight and self._batches:
            self._send_all()

    def _send(self, batch: _Batch) -> None:
        self._in_flight += 1
        protocol = self._protocol
        if protocol is None or protocol.lost:
            sending = asyncio.ensure_future(self._send_once_connected(batch))
            self._sending.add(sending)  # held until done: the loop keeps only a weak reference to a task
            sending.add_done_callback(self._sending.discard)
            return
        self.batches_sent += 1
        protocol.send(self._evalsha(batch), batch)

    async def _send_once_connected(self, batch: _Batch) -> None:
        try:
            protocol = await self._connected()
        except (OSError, ReplyError) as error:
            batch.failed(error)
            return
        except BaseException:
            batch.failed(ConnectionError("the connection to Redis was not set up"))
            raise
        self.batches_sent += 1
        protocol.send(self._evalsha(batch), batch)

    def resend(self, batch: _Batch) -> None:
        """The batch again as EVAL with the script's text: Redis's script cache was emptied (a restart, a
        SCRIPT FLUSH); EVAL loads it again for the next EVALSHA."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            batch.failed(ConnectionError("the connection to Redis is closed"))
            return
        head = b"$4\r\nEVAL\r\n" + bulk(self._script)
        protocol.send(self._command(head, batch), batch)

    def _evalsha(self, batch: _Batch) -> bytes:
        return self._command(self._evalsha_head, batch)

    def _command(self, head: bytes, batch: _Batch) -> bytes:
        """`EVALSHA sha numkeys keys... arguments...` (or EVAL) in RESP, from the calls' prebuilt parts."""
        calls = len(batch.callers)
        key_count = b"%d" % (calls * self._keys_per_call)
        return b"".join(
            (
                b"*%d\r\n" % (3 + calls * self._parts_per_call),
                head,
                bulk(key_count),
                *batch.keys,
                *batch.arguments,
            )
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
        reply = await protocol.ask(data)
        if isinstance(reply, ReplyError):
            raise reply
