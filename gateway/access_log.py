"""The access log: one line per request, formatted cheaply and written in batches from the event loop.

One `logging` call per request cost the proxy 45 % of its throughput (a LogRecord, a formatter, a lock and a
write each time). Here a request costs a clock read, one dict lookup and a three-part %-format: the time up to
the millisecond is formatted once per millisecond, and the middle of a line (client, request, status, bytes,
token), which a connection's requests repeat, once per distinct middle; formatting a whole line each time cost
~8 % of a proxied request (bench/callgrind.py --access-log). The lines are written with one `os.write` when
FLUSH_INTERVAL has passed since the oldest unwritten line or MAX_LINES wait, and on `close`, so a stop
(SIGTERM) loses nothing. A descriptor that cannot take more (a pipe whose reader lags) is waited on by the
event loop, never by blocking it.

A line, as text and as JSON (`log_format = "json"`):

    2026-12-01T21:52:21.123Z 203.0.113.7 "GET /api/posts" 200 98 token=k3x9q2 412us
    {"time":"2026-12-01T21:52:21.123Z","client":"203.0.113.7","method":"GET","path":"/api/posts","status":200,
     "bytes":98,"token_id":"k3x9q2","duration_us":412}

Time is UTC, when the answer was written; the client is the address the gateway judged (the TCP peer, or
what a trusted proxy forwarded for); bytes are the response body's; the duration runs from the start of the
gateway's work on the request to the end of its answer.

The path is the request target without its query string (which may carry anything a client puts there);
bytes outside printable ASCII, quotes and backslashes are written as `\\xNN`, so a line is always one line.
The token id is the token's public id, never the token; `-` (JSON: null) when the request named none.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.2  # seconds the oldest unwritten line may wait
MAX_LINES = 512  # unwritten lines that trigger a write at once

_TEXT_ADMIN = '%s.%03dZ %s "%s %s" %d %d admin_key=%s %dus\n'
_JSON_ADMIN = (
    '{"time":"%s.%03dZ","client":%s,"method":"%s","path":"%s","status":%d,"bytes":%d,"admin_key_id":%s,'
    '"duration_us":%d}\n'
)
# Bytes a path may hold as they are: printable ASCII but the quote and the backslash.
_PLAIN = bytes(byte for byte in range(0x21, 0x7F) if byte not in b'"\\')
PATH_MEMO_SIZE = 4096  # paths remembered with their logged form: API clients repeat theirs
PATH_MEMO_LONGEST = 512  # bytes of the longest path remembered (bounds the memo's memory)
# A line's time after its second, by millisecond: formatted once here, not per millisecond.
_TEXT_MILLISECONDS = tuple(".%03dZ " % millisecond for millisecond in range(1000))
_JSON_MILLISECONDS = tuple('.%03dZ",' % millisecond for millisecond in range(1000))
_QUESTION_MARK = ord("?")  # `int in bytes` is a byte scan; `b"?" in bytes` costs ~4x more (buffer, search)
MIDDLE_MEMO_SIZE = 4096  # lines' middles remembered (see AccessLog._middles)
MAX_BACKLOG = 100_000  # lines waiting behind a lagging reader before more are dropped (and counted)


def _escape(path: bytes) -> str:
    if not path:
        return "-"
    plain = _PLAIN
    return "".join(chr(byte) if byte in plain else "\\x%02x" % byte for byte in path)


def path_for_log(target: bytes) -> str:
    """The request target without its query string, safe to put between quotes on one line."""
    path = target.partition(b"?")[0]
    if path.translate(None, _PLAIN) or not path:
        return _escape(path)
    return path.decode("ascii")


def _json_path(target: bytes) -> str:
    path = path_for_log(target)
    return path.replace("\\", "\\\\") if "\\" in path else path


class AccessLog:
    """Buffered access lines for one process, written to a file descriptor (stderr, or an append-only file).

    Call `close` before the process ends; it writes what is left. A failing write (a full disk, a closed
    pipe) drops that batch and is logged once, and once more when writing works again, with the count lost.
    A non-blocking descriptor whose reader lags (a pipe to a slow collector) never blocks the event loop: the
    unwritten rest waits for the loop to report the descriptor writable, lines logged meanwhile wait behind
    it (up to MAX_BACKLOG, then they are counted as lost), and `close` waits until everything is written.
    """

    def __init__(
        self,
        fd: int = 2,
        *,
        json: bool = False,
        name: str = "stderr",
        owns_fd: bool = False,
        flush_interval: float = FLUSH_INTERVAL,
        max_lines: int = MAX_LINES,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._fd = fd
        self._name = name
        self._owns_fd = owns_fd
        self._json = json
        self._flush_interval = flush_interval
        self._max_lines = max_lines
        self._loop = loop or asyncio.get_running_loop()
        self._lines: list[str] = []
        self._paths: dict[bytes, str] = {}
        # A line's middle (client, request, status, bytes, token) by what it is made of: one connection's
        # requests repeat all of it, so most lines are a time, a remembered middle and a duration.
        self._middles: dict[tuple[str | None, str, bytes, int, int, str], str] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_stamp = ""
        self._millisecond = -1
        self._stamp = ""  # the line's start up to its middle, for the current millisecond
        self._unwritten: memoryview | None = None  # the rest of a batch the descriptor did not take yet
        self._unwritten_lines = 0
        self._lost = 0
        self.lines_written = 0
        self.writes = 0
        self._end = "}\n" if json else "us\n"
        self._milliseconds = _JSON_MILLISECONDS if json else _TEXT_MILLISECONDS
        self._middle = self._json_middle if json else self._text_middle

    @classmethod
    def open(cls, path: Path | None, *, json: bool = False) -> AccessLog:
        """The log on stderr (path None), or appended to `path`; each worker process opens its own."""
        if path is None:
            return cls(2, json=json)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return cls(fd, json=json, name=str(path), owns_fd=True)

    def request(
        self, client: str | None, token_id: str, method: str, target: bytes, status: int, length: int, elapsed: float
    ) -> None:
        """One answered proxy request; `elapsed` is the gateway's time on it, in seconds. It runs once per
        request, so it is written flat."""
        millisecond = int(time.time() * 1000)
        if millisecond != self._millisecond:
            self._new_millisecond(millisecond)
        if _QUESTION_MARK in target:  # the query is never logged, nor kept in the memo (it may carry a credential)
            target = target.partition(b"?")[0]
        key = (client, method, target, status, length, token_id)
        middle = self._middles.get(key) or self._middle(key)
        lines = self._lines
        # %d truncates a float as int() would, without the call.
        lines.append("%s%s%d%s" % (self._stamp, middle, elapsed * 1e6, self._end))
        if len(lines) >= self._max_lines:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(self._flush_interval, self._tick)

    def _text_middle(self, key: tuple[str | None, str, bytes, int, int, str]) -> str:
        client, method, target, status, length, token_id = key
        middle = '%s "%s %s" %d %d token=%s ' % (client or "-", method, self._path(target), status, length, token_id)
        self._remember(key, middle)
        return middle

    def _json_middle(self, key: tuple[str | None, str, bytes, int, int, str]) -> str:
        client, method, target, status, length, token_id = key
        middle = '"client":%s,"method":"%s","path":"%s","status":%d,"bytes":%d,"token_id":%s,"duration_us":' % (
            f'"{client}"' if client else "null", method, self._path(target), status, length,
            f'"{token_id}"' if token_id != "-" else "null",
        )
        self._remember(key, middle)
        return middle

    def _remember(self, key: tuple[str | None, str, bytes, int, int, str], middle: str) -> None:
        if len(key[2]) > PATH_MEMO_LONGEST:
            return
        if len(self._middles) >= MIDDLE_MEMO_SIZE:
            self._middles.clear()
        self._middles[key] = middle

    def _new_millisecond(self, millisecond: int) -> None:
        self._millisecond = millisecond
        second = millisecond // 1000
        if second != self._second:
            self._second = second
            self._second_stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            if self._json:
                self._second_stamp = '{"time":"' + self._second_stamp
        self._stamp = self._second_stamp + self._milliseconds[millisecond % 1000]

    def admin_request(
        self,
        client: str | None,
        key_id: str | None,
        method: str,
        target: bytes,
        status: int,
        length: int,
        elapsed: float,
    ) -> None:
        """A line for the admin API: the same shape, naming the admin key (its id) instead of a token."""
        now = time.time()
        second = int(now)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        if self._json:
            line = _JSON_ADMIN % (
                stamp, int((now - second) * 1000), f'"{client}"' if client else "null", method,
                _json_path(target), status, length, f'"{key_id}"' if key_id else "null", int(elapsed * 1_000_000),
            )
        else:
            line = _TEXT_ADMIN % (
                stamp, int((now - second) * 1000), client or "-", method, path_for_log(target),
                status, length, key_id or "-", int(elapsed * 1_000_000),
            )
        self._append(line)

    def _path(self, target: bytes) -> str:
        """The logged form of a target's path (without its query), remembered (bounded: cleared when full).
        Keyed by the path alone, so a client varying its query string hits it too."""
        path = target.partition(b"?")[0]
        logged = self._paths.get(path)
        if logged is not None:
            return logged
        logged = _json_path(path) if self._json else path_for_log(path)
        if len(path) > PATH_MEMO_LONGEST:
            return logged
        if len(self._paths) >= PATH_MEMO_SIZE:
            self._paths.clear()
        self._paths[path] = logged
        return logged

    def _append(self, line: str) -> None:
        lines = self._lines
        lines.append(line)
        if len(lines) >= self._max_lines:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(self._flush_interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write every buffered line now, in one write (more only if the descriptor takes part of it). Behind a
        batch the descriptor has not taken yet, the lines wait for it (`_writable`)."""
        if not self._lines:
            return
        if self._unwritten is not None:
            if len(self._lines) > MAX_BACKLOG:
                self._dropped(len(self._lines), None)
                self._lines = []
            return
        count = len(self._lines)
        data = memoryview("".join(self._lines).encode("utf-8", "replace"))
        self._lines = []
        self._write(data, count)

    def _write(self, data: memoryview, count: int) -> None:
        try:
            while data:
                try:
                    written = os.write(self._fd, data)
                except InterruptedError:
                    continue
                except BlockingIOError:
                    # A non-blocking pipe whose reader lags: the loop says when it can take more.
                    self._unwritten, self._unwritten_lines = data, count
                    self._loop.add_writer(self._fd, self._writable)
                    return
                data = data[written:]
                self.writes += 1
        except OSError as error:
            self._dropped(count, error)
            return
        self.lines_written += count
        if self._lost:
            log.warning("access log: writing to %s again; %d line(s) were lost", self._name, self._lost)
            self._lost = 0

    def _writable(self) -> None:
        self._loop.remove_writer(self._fd)
        data, count = self._unwritten, self._unwritten_lines
        self._unwritten = None
        if data is not None:
            self._write(data, count)
        if self._unwritten is None and self._lines:
            self.flush()

    def _dropped(self, count: int, error: OSError | None) -> None:
        if self._lost == 0:
            reason = "its reader lags" if error is None else errno.errorcode.get(error.errno or 0, error.strerror)
            log.warning("access log: cannot write to %s (%s); dropping lines until it works again", self._name, reason)
        self._lost += count

    def close(self) -> None:
        """Write what is left, waiting for a lagging reader if need be, and release the file."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._unwritten is not None:
            try:
                self._loop.remove_writer(self._fd)
            except RuntimeError:  # the loop is closed already
                pass
            data, self._unwritten = self._unwritten, None
            data = memoryview(bytes(data) + "".join(self._lines).encode("utf-8", "replace"))
            self._unwritten_lines += len(self._lines)
            self._lines = []
            self._write_waiting(data, self._unwritten_lines)
        elif self._lines:
            data = memoryview("".join(self._lines).encode("utf-8", "replace"))
            count, self._lines = len(self._lines), []
            self._write_waiting(data, count)
        if self._owns_fd:
            os.close(self._fd)
            self._owns_fd = False

    def _write_waiting(self, data: memoryview, count: int) -> None:
        """Write all of `data`, waiting (outside the loop: the process is stopping) while the descriptor is full."""
        try:
            while data:
                try:
                    written = os.write(self._fd, data)
                except (InterruptedError, BlockingIOError):
                    select.select([], [self._fd], [])
                    continue
                data = data[written:]
                self.writes += 1
        except OSError as error:
            self._dropped(count, error)
            return
        self.lines_written += count


def aiohttp_access_logger(
    sink: AccessLog, identify: Callable[[web.BaseRequest], str | None]
) -> type[AbstractAccessLogger]:
    """An aiohttp access-logger class (for the admin API's runner) that writes to `sink`; `identify` names the
    admin key a request was made with (its id), or None."""

    class _AccessLogger(AbstractAccessLogger):
        def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
            sink.admin_request(
                request.remote,
                identify(request),
                request.method,
                request.raw_path.encode("utf-8", "surrogateescape"),
                response.status,
                response.body_length,
                time,
            )

    return _AccessLogger
