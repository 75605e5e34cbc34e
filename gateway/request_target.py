"""The request target, read once: the path the access rules judge is the path sent upstream.

A gateway that judges one reading of a target and forwards another is bypassed by whatever upstream reads it
the other way (`/api/users#/../public/x`, `/api/public/..;/users`, `/api/public%2F..%2Fusers`). So the target is
parsed here, once, into one canonical path and the untouched query, and the canonical path is both what the
rules see and what is forwarded (Envoy's `normalize_path` + `merge_slashes`, with encoded slashes refused):

- unreserved characters (RFC 3986 2.3: letters, digits, `-._~`) are decoded, every other escape is kept in
  upper case, and a literal character that may not appear in a path is encoded;
- empty segments are merged (`//` -> `/`) and dot segments, literal or encoded, resolved (RFC 3986 5.2.4);
- what two common routers could read differently is refused with 400 and its own `code` (REFUSALS).

Rules see the canonical path decoded (`/api/caf%C3%A9` as `/api/café`): decoding can no longer make a
separator, a dot segment or another escape, because those are refused.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

from gateway.problems import GatewayError

# The stable problem codes of a refused target, and the detail shown for each.
REFUSALS = {
    "invalid_request_target": "The request target must be a path, such as /api/posts.",
    "fragment_in_target": "The request target holds a '#': a fragment is never sent to a server (RFC 9112).",
    "encoded_separator": (
        "The path holds a backslash or an encoded slash or backslash (%2F, %5C): servers disagree on whether"
        " it separates segments."
    ),
    "control_character": "The path holds a control character, raw or percent-encoded (such as %00).",
    "double_encoding": "The path holds an encoded percent sign (%25): a server that decodes twice reads another path.",
    "invalid_percent_encoding": "The path holds a '%' that is not followed by two hexadecimal digits.",
    "path_parameter": (
        "The path holds a ';' (or %3B): some servers strip ';parameters' from each segment before routing."
    ),
    "path_above_root": "The path's '..' segments climb above '/'.",
    "path_not_utf8": "The path does not decode to UTF-8 text.",
}


class RequestTarget(NamedTuple):
    """A target as the gateway reads it: `path` is canonical (what is forwarded), `judged` is that path decoded
    (what the access rules see), `query` is "" or "?..." exactly as sent."""

    path: str
    judged: str
    query: str


class TargetRefused(Exception):
    """Internal: why a target is refused, as a code of REFUSALS."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# A path already canonical, segment by segment: no escape, no character that needs one, no segment that
# starts with '.' (a dot segment, or a name like ".well-known" that the slow path keeps as it is).
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9\-_~!$&'()*+,=:@][A-Za-z0-9\-._~!$&'()*+,=:@]*)*/?")
_REFUSED_CHARACTER = re.compile(r"[\x00-\x20\x7f\\;]")
# Literal characters that RFC 3986 does not allow in a path ('"', '<', '[', '{', '|' ... and any byte >= 0x80).
_NEEDS_ESCAPE = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,=:@/%]")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})?")


def _escape_character(match: re.Match[str]) -> str:
    return "%%%02X" % ord(match.group())


def _canonical_escape(match: re.Match[str]) -> str:
    digits = match.group(1)
    if digits is None:
        raise TargetRefused("invalid_percent_encoding")
    byte = int(digits, 16)
    if byte in _UNRESERVED:
        return chr(byte)
    if byte in (0x2F, 0x5C):
        raise TargetRefused("encoded_separator")
    if byte == 0x25:
        raise TargetRefused("double_encoding")
    if byte < 0x20 or byte == 0x7F:
        raise TargetRefused("control_character")
    if byte == 0x3B:
        raise TargetRefused("path_parameter")
    return "%%%02X" % byte


def canonical_path(path: str) -> str:
    """The one canonical form of an absolute path (see the module's docstring); TargetRefused if none is safe."""
    if _PLAIN_PATH.fullmatch(path):
        return path
    refused = _REFUSED_CHARACTER.search(path)
    if refused is not None:
        character = refused.group()
        raise TargetRefused(
            "encoded_separator" if character == "\\" else "path_parameter" if character == ";" else "control_character"
        )
    escaped = _ESCAPE.sub(_canonical_escape, _NEEDS_ESCAPE.sub(_escape_character, path))
    segments: list[str] = []
    trailing_slash = False
    for segment in escaped.split("/")[1:]:
        trailing_slash = segment in ("", ".", "..")
        if segment == "..":
            if not segments:
                raise TargetRefused("path_above_root")
            segments.pop()
        elif not trailing_slash:
            segments.append(segment)
    if not segments:
        return "/"
    return "/" + "/".join(segments) + ("/" if trailing_slash else "")


def _judged(path: str) -> str:
    if "%" not in path:
        return path
    try:
        return unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise TargetRefused("path_not_utf8") from None


@functools.lru_cache(maxsize=16384)
def read_path(path: bytes) -> tuple[str, str] | str:
    """The canonical and the judged reading of a target's path (the part before any '?'), or the code of its
    refusal (cached as a code: a cached exception would grow a traceback each time it is raised). Cached by the
    path alone: a client varying the query string reuses its path's reading rather than evicting others."""
    if b"#" in path:
        return "fragment_in_target"
    try:
        # The proxy's parser admits only printable ASCII; a byte beyond it would be escaped as itself.
        canonical = canonical_path(path.decode("latin-1"))
        return canonical, _judged(canonical)
    except TargetRefused as refusal:
        return refusal.code


def _read(target: bytes) -> RequestTarget | str:
    if not target.startswith(b"/"):
        return "invalid_request_target"
    path, mark, query = target.partition(b"?")
    if query.find(b"#") >= 0:
        return "fragment_in_target"
    read = read_path(path)
    if isinstance(read, str):
        return read
    return RequestTarget(read[0], read[1], (mark + query).decode("utf-8", "surrogateescape"))


def read_target(target: bytes) -> RequestTarget:
    """The target of a request line, read once; a 400 GatewayError with one of the REFUSALS codes if it has no
    reading that every common router shares."""
    read = _read(target)
    if isinstance(read, str):
        raise GatewayError(400, read, REFUSALS[read])
    return read
