"""The pool of keep-alive connections to the upstream, and the encoding and validation of request heads."""

from __future__ import annotations

import asyncio
import re
import ssl as ssl_module
from collections import deque
from collections.abc import Iterable

from gateway.upstream_client.connection import IN_MEMORY, Body, Connection
from gateway.upstream_client.errors import (
    UpstreamConnectError,
    UpstreamConnectionError,
    UpstreamConnectTimeout,
    UpstreamError,
)
from gateway.upstream_client.response import UpstreamResponse

# RFC 9110 section 9.2.2: only these may be sent again after a connection dies without an answer.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
# Written by the pool from `body`, `content_length` and `chunked`; refused in the caller's headers.
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_BLOCK = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\x00]*\r\n)*")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_CACHE_MAX = 1024
_NORMAL, _CONNECTION, _FRAMING = 0, 1, 2


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
        self._idle: deque[Connection] = deque()  # oldest left, newest right
        self._busy: set[Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._methods: dict[str, bytes] = {}
        self._header_kinds: dict[str, int] = {}
        self._last_block: tuple[bytes, bool] = (b"", False)
        self._last_target: tuple[str | None, bytes] = (None, b"")
        self.opened = 0  # connections opened so far

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def open_count(self) -> int:
        """Connections open now, idle or in use."""
        return len(self._idle) + len(self._busy)

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
            # _exchange inline: the usual path (an idle connection) awaits one coroutine less per request.
            self._busy.add(conn)
            try:
                response = await conn.exchange(head, body, content_length, chunked, is_head, close)
            except UpstreamConnectionError as error:
                self._finished(conn, False)
                if not error.nothing_received or not isinstance(body, (*IN_MEMORY, type(None))):
                    raise
                if not self._retry_non_idempotent and method not in IDEMPOTENT_METHODS:
                    raise
            except BaseException:
                self._finished(conn, False)
                raise
            else:
                if response.done:
                    response.detach(True)
                return response
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
        self, conn: Connection, head: bytes, body: Body, length: int | None, chunked: bool, is_head: bool,
        close: bool,
    ) -> UpstreamResponse:
        self._busy.add(conn)
        try:
            response = await conn.exchange(head, body, length, chunked, is_head, close)
        except BaseException:
            self._finished(conn, False)
            raise
        if response.done:
            response.detach(True)
        return response

    async def _connect(self) -> Connection:
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

    def _new_connection(self) -> Connection:
        return Connection(
            self._loop,
            read_timeout=self._read_timeout,
            max_header_bytes=self._max_header_bytes,
            read_high_water=self._read_high_water,
            on_finished=self._finished,
            on_lost=self._lost,
        )

    def _pop_idle(self) -> Connection | None:
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

    def _finished(self, conn: Connection, reuse: bool) -> None:
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

    def _lost(self, conn: Connection) -> None:
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
        if target == self._last_target[0]:  # a client repeating its request: checked and encoded once
            encoded_target = self._last_target[1]
        elif not target or _BAD_TARGET.search(target):
            raise ValueError("the request target is empty or holds a space or control character")
        else:
            encoded_target = target.encode("utf-8", "surrogateescape")
            self._last_target = (target, encoded_target)
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
        elif isinstance(body, IN_MEMORY):
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
        return b"".join((prefix, encoded_target, b" HTTP/1.1\r\n", block, framing,
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
