"""The access log: one line per request, formatted cheaply and written in batches from the event loop.

One `logging` call per request cost the proxy 45 % of its throughput (a LogRecord, a formatter, a lock and a
write each time). Here a request costs one %-format of integers and strings (the path of a target seen lately
is remembered) and a list append; the lines are written with one `os.write` when FLUSH_INTERVAL has passed
since the oldest unwritten line or MAX_LINES wait, and on `close`, so a stop (SIGTERM) loses nothing.

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
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.2  # seconds the oldest unwritten line may wait
MAX_LINES = 512  # unwritten lines that trigger a write at once

_TEXT = '%s.%03dZ %s "%s %s" %d %d token=%s %dus\n'
_TEXT_ADMIN = '%s.%03dZ %s "%s %s" %d %d admin_key=%s %dus\n'
_JSON = (
    '{"time":"%s.%03dZ","client":%s,"method":"%s","path":"%s","status":%d,"bytes":%d,"token_id":%s,'
    '"duration_us":%d}\n'
)
_JSON_ADMIN = _JSON.replace('"token_id"', '"admin_key_id"')
# Bytes a path may hold as they are: printable ASCII but the quote and the backslash.
_PLAIN = bytes(byte for byte in range(0x21, 0x7F) if byte not in b'"\\')
PATH_MEMO_SIZE = 4096  # paths remembered with their logged form: API clients repeat theirs
PATH_MEMO_LONGEST = 512  # bytes of the longest path remembered (bounds the memo's memory)


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
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""
        self._lost = 0
        self.lines_written = 0
        self.writes = 0
        self.request = self._json_request if json else self._text_request

    @classmethod
    def open(cls, path: Path | None, *, json: bool = False) -> AccessLog:
        """The log on stderr (path None), or appended to `path`; each worker process opens its own."""
        if path is None:
            return cls(2, json=json)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return cls(fd, json=json, name=str(path), owns_fd=True)

    # One of these two is `request`: the proxy calls it once per answered request, so it is written flat.

    def _text_request(
        self, client: str | None, token_id: str, method: str, target: bytes, status: int, length: int, elapsed: float
    ) -> None:
        """`elapsed` is the gateway's time on the request, in seconds."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._new_second(second)
        raw_path = target.partition(b"?")[0]
        path = self._paths.get(raw_path) or self._path(raw_path)
        lines = self._lines
        # %d truncates a float as int() would, without the call.
        lines.append(
            _TEXT
            % (self._stamp, (now - second) * 1000, client or "-", method, path, status, length, token_id, elapsed * 1e6)
        )
        if len(lines) >= self._max_lines:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(self._flush_interval, self._tick)

    def _json_request(
        self, client: str | None, token_id: str, method: str, target: bytes, status: int, length: int, elapsed: float
    ) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._new_second(second)
        raw_path = target.partition(b"?")[0]
        path = self._paths.get(raw_path) or self._path(raw_path)
        lines = self._lines
        lines.append(
            _JSON
            % (
                self._stamp, (now - second) * 1000, f'"{client}"' if client else "null", method, path,
                status, length, f'"{token_id}"' if token_id != "-" else "null", elapsed * 1e6,
            )
        )
        if len(lines) >= self._max_lines:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(self._flush_interval, self._tick)

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
        if second != self._second:
            self._new_second(second)
        if self._json:
            line = _JSON_ADMIN % (
                self._stamp, int((now - second) * 1000), f'"{client}"' if client else "null", method,
                _json_path(target), status, length, f'"{key_id}"' if key_id else "null", int(elapsed * 1_000_000),
            )
        else:
            line = _TEXT_ADMIN % (
                self._stamp, int((now - second) * 1000), client or "-", method, path_for_log(target),
                status, length, key_id or "-", int(elapsed * 1_000_000),
            )
        self._append(line)

    def _path(self, path: bytes) -> str:
        """The logged form of a path (a target without its query) not seen lately, remembered (bounded:
        cleared when full). Keyed by the path alone, so a client varying its query string hits it too."""
        logged = _json_path(path) if self._json else path_for_log(path)
        if len(path) > PATH_MEMO_LONGEST:
            return logged
        if len(self._paths) >= PATH_MEMO_SIZE:
            self._paths.clear()
        self._paths[path] = logged
        return logged

    def _new_second(self, second: int) -> None:
        self._second = second
        self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))

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
        """Write every buffered line now, in one write (more only if the kernel takes part of it)."""
        if not self._lines:
            return
        count = len(self._lines)
        data = memoryview("".join(self._lines).encode("utf-8", "replace"))
        self._lines = []
        try:
            while data:
                try:
                    written = os.write(self._fd, data)
                except InterruptedError:
                    continue
                except BlockingIOError:
                    # A non-blocking stderr whose reader lags: the event loop waits rather than lose lines.
                    time.sleep(0.001)
                    continue
                data = data[written:]
                self.writes += 1
        except OSError as error:
            if self._lost == 0:
                log.warning(
                    "access log: cannot write to %s (%s); dropping lines until it works again",
                    self._name, errno.errorcode.get(error.errno or 0, error.strerror),
                )
            self._lost += count
            return
        self.lines_written += count
        if self._lost:
            log.warning("access log: writing to %s again; %d line(s) were lost", self._name, self._lost)
            self._lost = 0

    def close(self) -> None:
        """Write what is left and release the file."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self._owns_fd:
            os.close(self._fd)
            self._owns_fd = False


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
