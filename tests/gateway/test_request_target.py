"""The request target's one reading: canonical paths, and a 400 with its own code for each ambiguous class."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.problems import GatewayError
from gateway.request_target import REFUSALS, RequestTarget, read_path, read_target
from tests.conftest import Gateway, Upstream, send_raw


@pytest.mark.parametrize(
    ("raw", "path", "judged", "query"),
    [
        ("/api/users", "/api/users", "/api/users", ""),
        ("/", "/", "/", ""),
        ("/api/users/", "/api/users/", "/api/users/", ""),
        ("/api/%75sers", "/api/users", "/api/users", ""),  # unreserved escapes are decoded
        ("/api/%7efoo%2D%5F%2e", "/api/~foo-_.", "/api/~foo-_.", ""),
        ("/api/a%3ab%40c%21", "/api/a%3Ab%40c%21", "/api/a:b@c!", ""),  # reserved escapes kept, upper case
        ("/api/caf%c3%a9", "/api/caf%C3%A9", "/api/café", ""),
        ("/api/a b".replace(" ", "%20"), "/api/a%20b", "/api/a b", ""),
        ('/api/a"b<c>{d}|e^f`g[h]', "/api/a%22b%3Cc%3E%7Bd%7D%7Ce%5Ef%60g%5Bh%5D", '/api/a"b<c>{d}|e^f`g[h]', ""),
        ("/api/a%3Fb%23c", "/api/a%3Fb%23c", "/api/a?b#c", ""),  # an encoded '?' or '#' is data in a segment
        ("//api///users//", "/api/users/", "/api/users/", ""),  # empty segments merged
        ("/api/./users/.", "/api/users/", "/api/users/", ""),
        ("/api/public/../users", "/api/users", "/api/users", ""),
        ("/api/public/%2e%2E/users", "/api/users", "/api/users", ""),  # encoded dot segments too
        ("/api/public/.%2e/users", "/api/users", "/api/users", ""),
        ("/api/users/..", "/api/", "/api/", ""),
        ("/api/..", "/", "/", ""),
        ("/.well-known/x/...", "/.well-known/x/...", "/.well-known/x/...", ""),  # not dot segments
        ("/api/posts?q=%2F..%2F&x=;y\\z", "/api/posts", "/api/posts", "?q=%2F..%2F&x=;y\\z"),  # query as sent
        ("/api/posts?", "/api/posts", "/api/posts", "?"),
    ],
)
def test_a_target_has_one_canonical_path_and_its_query_as_sent(raw: str, path: str, judged: str, query: str) -> None:
    assert read_target(raw.encode()) == RequestTarget(path, judged, query)


REFUSED = [
    ("fragment_in_target", "/api/users#/../public/x"),
    ("fragment_in_target", "/api/public/x?q=1#frag"),
    ("fragment_in_target", "/api/public/#"),
    ("fragment_in_target", "/api/public/x?#frag"),  # a fragment right after the '?'
    ("encoded_separator", "/api/public%2F..%2Fusers"),
    ("encoded_separator", "/api/public%2f..%2fusers"),
    ("encoded_separator", "/api/public%5C..%5Cusers"),
    ("encoded_separator", "/api/public\\..\\users"),
    ("control_character", "/api/users%00.json"),
    ("control_character", "/api/users%0a"),
    ("control_character", "/api/users%7F"),
    ("control_character", "/api/users\x01"),
    ("control_character", "/api/a b"),  # a raw space ends a request target: never escaped into %20
    ("double_encoding", "/api/public%252F..%252Fusers"),
    ("double_encoding", "/api/%25%32%46"),  # %25 + decoded "2F": a second decoding would make a slash
    ("double_encoding", "/api/100%25"),
    ("invalid_percent_encoding", "/api/users%"),
    ("invalid_percent_encoding", "/api/users%2"),
    ("invalid_percent_encoding", "/api/%zzusers"),
    ("invalid_percent_encoding", "/api/%u0075sers"),  # IIS's %u escapes
    ("path_parameter", "/api/public/..;/users"),
    ("path_parameter", "/api/users;jsessionid=1"),
    ("path_parameter", "/api/public;x/../../users"),
    ("path_parameter", "/api/users%3Bx"),
    ("path_above_root", "/../api/users"),
    ("path_above_root", "/api/../../users"),
    ("path_above_root", "/%2e%2e/api/users"),
    ("path_above_root", "/api/..%2F..%2Fusers".replace("%2F", "/")),
    ("path_not_utf8", "/api/users%ff"),
    ("path_not_utf8", "/api/%c3"),
    ("path_not_utf8", "/api/%c0%af"),  # an overlong '/'
    ("invalid_request_target", "http://api.example/api/users"),
    ("invalid_request_target", "*"),
]


@pytest.mark.parametrize(("code", "raw"), REFUSED)
def test_an_ambiguous_target_is_refused_with_its_code(code: str, raw: str) -> None:
    with pytest.raises(GatewayError) as refused:
        read_target(raw.encode())
    assert (refused.value.status, refused.value.code, refused.value.detail) == (400, code, REFUSALS[code])


def test_a_query_that_is_not_utf8_is_forwarded_byte_for_byte() -> None:
    target = read_target(b"/api/posts?q=\xff\xfe")
    assert target.query == "?q=\udcff\udcfe"
    assert target.query.encode("utf-8", "surrogateescape") == b"?q=\xff\xfe"


def test_every_refusal_code_is_tested() -> None:
    assert {code for code, _ in REFUSED} == set(REFUSALS)


def test_a_path_is_read_once_whatever_query_follows_it() -> None:
    """The path's reading is cached by the path alone: a client varying its query string (a cache buster, a
    page number) reuses it rather than filling the cache with one entry per target."""
    read_path.cache_clear()
    first = read_target(b"/api/posts/%7e1/./x?page=1")
    second = read_target(b"/api/posts/%7e1/./x?page=2")
    third = read_target(b"/api/posts/%7e1/./x")
    assert (first.path, first.judged, first.query) == ("/api/posts/~1/x", "/api/posts/~1/x", "?page=1")
    assert (second.path, second.query, third.query) == (first.path, "?page=2", "")
    info = read_path.cache_info()
    assert (info.misses, info.hits, info.currsize) == (1, 2, 1)


def test_a_fragment_in_the_query_is_refused_even_when_the_path_was_read_before() -> None:
    read_target(b"/api/posts?a=1")
    with pytest.raises(GatewayError) as refused:
        read_target(b"/api/posts?a=1#x")
    assert refused.value.code == "fragment_in_target"


PIECES = ["/", "//", ".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2f", "%2F", "%5c", "\\", "%25", "%252e", "%",
          "%zz", "%ff", "%00", "%c3%a9", "%41", "a", "API", "users", "public", "é", ";", "?", "#", " ", '"', "~"]
raw_paths = st.one_of(
    st.text(max_size=40).map(lambda text: "/" + text),
    st.lists(st.sampled_from(PIECES), max_size=16).map(lambda pieces: "/" + "".join(pieces)),
)
_CANONICAL = re.compile(r"(?:/(?:[A-Za-z0-9\-._~!$&'()*+,=:@]|%[0-9A-F]{2})+)*/?")


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(raw_paths)
def test_a_canonical_path_is_a_fixed_point_without_ambiguity(raw: str) -> None:
    try:
        target = read_target(raw.encode("utf-8", "surrogatepass"))
    except GatewayError as refused:
        assert refused.status == 400 and refused.code in REFUSALS
        return
    path = target.path
    assert _CANONICAL.fullmatch(path), path
    assert not {".", ".."} & set(path.split("/"))
    assert not re.search(r"%(?:2F|5C|25|3B|[01][0-9A-F]|7F)", path)
    assert not re.search(r"%(?:[46][1-9A-F]|[57][0-9A]|3[0-9]|2D|2E|5F|7E)", path)  # unreserved are decoded
    assert read_target((path + target.query).encode()) == target


async def test_the_refusal_is_problem_json_and_nothing_reaches_the_upstream(
    gateway: Gateway, upstream: Upstream
) -> None:
    token = (await gateway.create_token(access_level="administrative"))["token"]
    seen = len(upstream.requests)
    for code, raw in REFUSED:
        if raw[0] != "/" or "\x01" in raw or " " in raw:
            continue  # answered by the HTTP parser or the absolute-form check
        request = f"GET {raw} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        status, reply = await send_raw(gateway.proxy, request.encode())
        assert status == 400, raw
        assert b"Content-Type: application/problem+json" in reply
        assert f'"code": "{code}"'.encode() in reply, raw
    assert len(upstream.requests) == seen
