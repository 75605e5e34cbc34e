"""Step 4: access levels, matched on the target's canonical path, which is also the path forwarded."""

from __future__ import annotations

import pytest

from gateway.access_levels import (
    ALL_METHODS,
    AccessLevel,
    AccessLevelConfigError,
    compile_path_pattern,
    parse_access_levels,
)
from gateway.request_target import read_target
from gateway.settings import load_settings
from tests.conftest import Gateway, GatewayFactory, Upstream, send_raw


@pytest.mark.parametrize(
    ("raw", "judged"),
    [
        ("/api/%75sers", "/api/users"),
        ("/api/./users", "/api/users"),
        ("/api/posts/../users", "/api/users"),
        ("/api/public/%2e%2e/users", "/api/users"),
        ("//api//users/", "/api/users/"),
        ("/", "/"),
    ],
)
def test_paths_are_judged_decoded_with_dot_segments_resolved(raw: str, judged: str) -> None:
    assert read_target(raw.encode()).judged == judged


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("/**", ["/", "/a", "/a/b/c"], []),
        ("/api/users/**", ["/api/users", "/api/users/", "/api/users/1/x"], ["/api/usersx", "/api", "/api/user"]),
        ("/api/*/admins", ["/api/1/admins", "/api/1/admins/"], ["/api/admins", "/api/1/2/admins"]),
        ("/api/spaces/*", ["/api/spaces/1", "/api/spaces/1/"], ["/api/spaces", "/api/spaces/", "/api/spaces/1/x"]),
        ("/api/v*/x", ["/api/v1/x", "/api/v/x"], ["/api/w1/x"]),
    ],
)
def test_path_patterns(pattern: str, matching: list[str], not_matching: list[str]) -> None:
    compiled = compile_path_pattern(pattern)
    assert all(compiled.match(path) for path in matching)
    assert not any(compiled.match(path) for path in not_matching)


def test_deny_patterns_match_a_literal_segment_with_any_suffix() -> None:
    """Rails routes `/api/users.json` as `/api/users` (`(.:format)`), IIS `/api/users./7` as `/api/users/7`."""
    compiled = compile_path_pattern("/api/users/**", any_suffix=True)
    assert all(compiled.match(path) for path in ["/api/users.json", "/api/users./7", "/api.v1/users/7"])
    assert not any(compiled.match(path) for path in ["/api/usersx", "/api/users-json", "/api/public"])


@pytest.mark.parametrize(
    "levels",
    [
        {},
        {"Bad Name": {"allow": [{"paths": ["/**"]}]}},
        {"x": {"allow": []}},
        {"x": {"allow": [{"paths": ["no-slash"]}]}},
        {"x": {"allow": [{"paths": ["/a**"]}]}},
        {"x": {"allow": [{"methods": ["G3T"], "paths": ["/"]}]}},
        {"x": {"allow": [{"paths": ["/"], "extra": 1}]}},
        {"x": {"allow": [{"paths": ["/"]}], "typo": 1}},
    ],
)
def test_invalid_access_level_config_is_refused(levels: dict[str, object]) -> None:
    with pytest.raises(AccessLevelConfigError):
        parse_access_levels(levels)


async def _status(gateway: Gateway, token: str, method: str, path: str) -> int:
    response = await gateway.call(token, path, method=method)
    if response.status == 403 and method != "HEAD":  # a HEAD answer has no body to read the code from
        assert (await response.json())["code"] == "insufficient_access_level"
    return response.status


@pytest.mark.parametrize(
    ("level", "method", "path", "status"),
    [
        ("administrative", "DELETE", "/api/users/7", 200),
        ("managing_editorial", "POST", "/api/posts", 200),
        ("managing_editorial", "GET", "/api/users/7", 403),
        ("managing_editorial", "GET", "/api/%75sers/7", 403),
        ("managing_editorial", "GET", "/api/./users", 403),
        ("managing_editorial", "GET", "/api/posts/../users", 403),
        ("managing_editorial", "PUT", "/api/spaces/3/settings", 403),
        ("managing_editorial", "GET", "/api/spaces/3", 200),
        ("managing_editorial", "GET", "/api/users.json", 403),
        ("managing_editorial", "GET", "/api/users./7", 403),
        ("managing_editorial", "GET", "/api/spaces/3/settings.xml", 403),
        ("managing_editorial", "POST", "/api/spaces.json", 403),
        ("restricted_read_only", "GET", "/api/branding.json", 403),
        ("editorial", "GET", "/api/users", 200),
        ("editorial", "POST", "/api/posts", 200),
        ("editorial", "POST", "/api/users", 403),
        ("editorial", "DELETE", "/api/comments/5", 200),
        ("read_only", "GET", "/api/users", 200),
        ("read_only", "OPTIONS", "/api/users", 200),
        ("read_only", "POST", "/api/posts", 403),
        ("read_only", "PATCH", "/api/posts/1", 403),
        ("restricted_read_only", "GET", "/api/public/info", 200),
        ("restricted_read_only", "HEAD", "/api/news/1", 200),
        ("restricted_read_only", "OPTIONS", "/api/public/info", 403),
        ("restricted_read_only", "GET", "/api/users", 403),
        ("restricted_read_only", "GET", "/api/public/../users", 403),
        ("restricted_read_only", "GET", "/api/public/%2e%2e/users", 403),
    ],
)
async def test_default_levels_on_the_example_paths(
    gateway: Gateway, level: str, method: str, path: str, status: int
) -> None:
    token = (await gateway.create_token(access_level=level))["token"]
    assert await _status(gateway, token, method, path) == status


@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [
        ("/api/posts/%7efoo/./a%3ab/../b%c3%a9?q=%20x&y=1&y=2&p=/../%2F;#", None),
        ("/api/posts/%7efoo/./a%3ab/../b%c3%a9?q=%20x&y=1&y=2&p=/../%2F;", "/api/posts/~foo/b%C3%A9?q=%20x&y=1&y=2&p=/../%2F;"),
        ("//api//posts/", "/api/posts/"),
        ("/api/posts/a\"b{c}", "/api/posts/a%22b%7Bc%7D"),
        ("/api/posts?", "/api/posts?"),
    ],
)
async def test_the_upstream_sees_the_judged_path_and_the_query_untouched(
    gateway: Gateway, upstream: Upstream, raw: str, forwarded: str | None
) -> None:
    token = (await gateway.create_token(access_level="read_only"))["token"]
    seen = len(upstream.requests)
    request = f"GET {raw} HTTP/1.1\r\nHost: api.example\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    status, reply = await send_raw(gateway.proxy, request.encode())
    if forwarded is None:  # a '#', even in the query
        assert status == 400 and b'"code": "fragment_in_target"' in reply
        assert len(upstream.requests) == seen
    else:
        assert status == 200
        assert upstream.last["raw_path"] == forwarded


async def test_the_upstream_base_path_holds_every_forwarded_path(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await start_gateway(upstream=upstream.url + "/v1")
    token = (await gateway.create_token(access_level="administrative"))["token"]
    for raw, forwarded in [
        ("/api/posts?x=1", "/v1/api/posts?x=1"),
        ("/", "/v1/"),
        ("/api/../admin", "/v1/admin"),
        ("/api/%2e%2e/admin/", "/v1/admin/"),
    ]:
        request = f"GET {raw} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        status, _ = await send_raw(gateway.proxy, request.encode())
        assert status == 200, raw
        assert upstream.last["raw_path"] == forwarded
    seen = len(upstream.requests)
    for raw in ("/../admin", "/api/../../admin", "/%2e%2e/admin", "/.%2E/v2/admin"):
        request = f"GET {raw} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        status, reply = await send_raw(gateway.proxy, request.encode())
        assert status == 400, raw
        assert b'"code": "path_above_root"' in reply
    assert len(upstream.requests) == seen


async def test_dot_segments_cannot_escape_a_level_through_raw_bytes(gateway: Gateway, upstream: Upstream) -> None:
    token = (await gateway.create_token(access_level="restricted_read_only"))["token"]
    seen = len(upstream.requests)
    for raw, code in [
        ("/api/public/../users", b"insufficient_access_level"),
        ("/api/public/%2e%2e/users", b"insufficient_access_level"),
        ("/api/public/%2E%2E%2Fusers", b"encoded_separator"),
        ("/api/public/..;/users", b"path_parameter"),
        ("/api/users#/../public/x", b"fragment_in_target"),
    ]:
        request = f"GET {raw} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        status, reply = await send_raw(gateway.proxy, request.encode())
        assert status == (403 if code == b"insufficient_access_level" else 400), raw
        assert code in reply
    assert len(upstream.requests) == seen


@pytest.mark.parametrize(
    ("rule_case", "path", "status"),
    [
        ("deny_any_case", "/API/Users/7", 403),  # a deny of /api/users/** holds in any case
        ("deny_any_case", "/api/u%C5%BFers/7", 403),  # 'ſ' upper-cases to 'S' (ASP.NET's OrdinalIgnoreCase)
        ("deny_any_case", "/api/posts/1", 200),
        ("exact", "/API/Users/7", 200),
        ("any_case", "/API/Users/7", 403),
    ],
)
async def test_deny_rules_match_any_case_unless_configured(
    start_gateway: GatewayFactory, rule_case: str, path: str, status: int
) -> None:
    gateway = await start_gateway(access_rule_case=rule_case)
    token = (await gateway.create_token(access_level="managing_editorial"))["token"]
    assert await _status(gateway, token, "GET", path) == status


@pytest.mark.parametrize(
    ("rule_case", "path", "status"),
    [
        ("deny_any_case", "/api/public/x", 200),
        ("deny_any_case", "/API/PUBLIC/x", 403),  # an allow opens only the case it is written in
        ("deny_any_case", "/api/Branding", 403),
        ("exact", "/API/PUBLIC/x", 403),
        ("any_case", "/API/PUBLIC/x", 200),
    ],
)
async def test_allow_rules_match_the_case_written_unless_configured(
    start_gateway: GatewayFactory, rule_case: str, path: str, status: int
) -> None:
    gateway = await start_gateway(access_rule_case=rule_case)
    token = (await gateway.create_token(access_level="restricted_read_only"))["token"]
    assert await _status(gateway, token, "GET", path) == status


async def test_changing_the_access_level_holds_on_the_next_request(gateway: Gateway) -> None:
    created = await gateway.create_token(access_level="read_only")
    assert await _status(gateway, created["token"], "POST", "/api/posts") == 403
    status, _ = await gateway.admin_call("PATCH", f"/v1/tokens/{created['id']}", json={"access_level": "editorial"})
    assert status == 200
    assert await _status(gateway, created["token"], "POST", "/api/posts") == 200


def _default_levels() -> dict[str, AccessLevel]:
    return load_settings(environ={}, overrides={"upstream": "http://127.0.0.1:1"}).access_levels


def _example_path(pattern: str) -> str:
    """A concrete path the pattern matches: `**` as two segments, `*` as one."""
    return pattern.replace("**", "x1/x2").replace("*", "s1")


def _deny_cases() -> list[tuple[str, int, str, str]]:
    """(level, deny rule index, method, path) for every method and pattern of every default deny rule that
    an allow rule of the level would otherwise let through: the cases where the deny rule alone decides."""
    cases = []
    for name, level in _default_levels().items():
        for index, rule in enumerate(level.deny):
            for pattern in rule.patterns:
                for method in sorted(rule.methods & PROXIED_METHODS):
                    path = _example_path(pattern)
                    if any(allow.matches(method, path) for allow in level.allow):
                        cases.append((name, index, method, path))
    return cases


PROXIED_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})
DENY_CASES = _deny_cases()


def test_the_default_levels_deny_what_the_config_lists() -> None:
    levels = _default_levels()
    assert [len(levels[name].deny) for name in sorted(levels)] == [0, 1, 2, 0, 0]
    counts = {(name, rule): sum(1 for case in DENY_CASES if case[:2] == (name, rule)) for name, rule, _, _ in DENY_CASES}
    assert counts == {("managing_editorial", 0): 5 * 7, ("managing_editorial", 1): 2 * 4, ("editorial", 0): 3}


@pytest.mark.parametrize(("level", "rule", "method", "path"), DENY_CASES)
def test_every_deny_rule_of_every_default_level_refuses(level: str, rule: int, method: str, path: str) -> None:
    access_level = _default_levels()[level]
    assert access_level.deny[rule].matches(method, path)
    assert access_level.permits(method, path) is False


@pytest.mark.parametrize("level", sorted({case[0] for case in DENY_CASES}))
async def test_every_deny_rule_is_honoured_through_the_proxy(gateway: Gateway, upstream: Upstream, level: str) -> None:
    token = (await gateway.create_token(access_level=level))["token"]
    cases = [(method, path) for name, _, method, path in DENY_CASES if name == level]
    seen = len(upstream.requests)
    verdicts = [await _status(gateway, token, method, path) for method, path in cases]
    assert verdicts == [403] * len(cases), list(zip(cases, verdicts, strict=True))
    assert len(upstream.requests) == seen
    # The same paths with a method no deny rule names (where one exists) get through.
    assert await _status(gateway, token, "GET", "/api/spaces/s1") == 200
    assert len(upstream.requests) == seen + 1


ALLOW_ALL = [{"paths": ["/**"]}]


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ({}, "access_levels must define at least one level"),
        ({"Bad Name": {"allow": ALLOW_ALL}}, "access level name 'Bad Name' must be lower_snake_case"),
        ({"x": []}, "access_levels.x must be a table"),
        ({"x": {"allow": ALLOW_ALL, "typo": 1}}, "access_levels.x: unknown key(s) ['typo']"),
        ({"x": {"allow": []}}, "access_levels.x.allow must list at least one rule"),
        ({"x": {"allow": ALLOW_ALL, "deny": {}}}, "access_levels.x.deny must be a list of rules"),
        ({"x": {"allow": ALLOW_ALL, "description": 1}}, "access_levels.x.description must be a string"),
        ({"x": {"allow": ALLOW_ALL, "max_body_bytes": -1}}, "access_levels.x.max_body_bytes must be a whole number of bytes"),
        ({"x": {"allow": ALLOW_ALL, "max_body_bytes": True}}, "access_levels.x.max_body_bytes must be a whole number of bytes"),
        ({"x": {"allow": ALLOW_ALL, "max_body_bytes": 1.5}}, "access_levels.x.max_body_bytes must be a whole number of bytes"),
        ({"x": {"allow": ["/"]}}, "access_levels.x.allow: each rule is a table with 'methods' and 'paths'"),
        ({"x": {"allow": [{"paths": ["/"], "extra": 1}]}}, "access_levels.x.allow: unknown key(s) ['extra']"),
        ({"x": {"allow": ALLOW_ALL, "deny": [{"paths": ["/"], "x": 1}]}}, "access_levels.x.deny: unknown key(s) ['x']"),
        ({"x": {"allow": [{"methods": [], "paths": ["/"]}]}},
         "access_levels.x.allow.methods must be a non-empty list of HTTP methods or '*'"),
        ({"x": {"allow": [{"methods": [1], "paths": ["/"]}]}},
         "access_levels.x.allow.methods must be a non-empty list of HTTP methods or '*'"),
        ({"x": {"allow": [{"methods": "GET", "paths": ["/"]}]}},
         "access_levels.x.allow.methods must be a non-empty list of HTTP methods or '*'"),
        ({"x": {"allow": [{"paths": []}]}}, "access_levels.x.allow.paths must be a non-empty list of path patterns"),
        ({"x": {"allow": [{"paths": [1]}]}}, "access_levels.x.allow.paths must be a non-empty list of path patterns"),
        ({"x": {"allow": [{"paths": "/"}]}}, "access_levels.x.allow.paths must be a non-empty list of path patterns"),
        ({"x": {"allow": [{"methods": ["G3T"], "paths": ["/"]}]}}, "access_levels.x.allow.methods: 'G3T' is not an HTTP method"),
        ({"x": {"allow": [{"paths": ["no-slash"]}]}}, "access_levels.x.allow: path pattern 'no-slash' must start with '/'"),
        ({"x": {"allow": [{"paths": ["/a#b"]}]}}, "access_levels.x.allow: path pattern '/a#b' has an invalid segment 'a#b'"),
        ({"x": {"allow": [{"paths": ["/a**"]}]}}, "access_levels.x.allow: path pattern '/a**': '**' must be a whole segment"),
    ],
)
def test_invalid_access_level_config_is_refused_naming_the_place(levels: dict[str, object], message: str) -> None:
    with pytest.raises(AccessLevelConfigError) as refused:
        parse_access_levels(levels)
    assert str(refused.value) == message


def test_a_level_is_parsed_with_every_field_it_names() -> None:
    levels = parse_access_levels(
        {
            "x": {
                "description": "Some.",
                "max_body_bytes": 0,
                "allow": [{"methods": ["PROPFIND", "*"], "paths": ["/a", "/b/**"]}, {"paths": ["/c"]}],
                "deny": [{"methods": ["delete"], "paths": ["/a"]}],
            },
            "y": {"allow": ALLOW_ALL, "max_body_bytes": 1},
        }
    )
    x, y = levels["x"], levels["y"]
    assert (x.name, x.description, x.max_body_bytes) == ("x", "Some.", 0)
    assert (y.name, y.description, y.max_body_bytes) == ("y", "", 1)
    assert x.allow[0].methods == ALL_METHODS | {"PROPFIND"}
    assert x.allow[0].patterns == ("/a", "/b/**")
    assert x.allow[1].methods == ALL_METHODS
    assert x.deny[0].methods == frozenset({"DELETE"}) and x.deny[0].patterns == ("/a",)
    assert [x.permits(method, "/a") for method in ("PROPFIND", "GET", "DELETE")] == [True, True, False]


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("/a/**/b", ["/a/b", "/a/x/b", "/a/x/y/b", "/a/x/b/"], ["/a", "/a/x", "/a/b/c", "/a/xb"]),
        ("/a/**/b/**", ["/a/b", "/a/x/b/y/z"], ["/a/x", "/a/bb"]),
        ("/a/", ["/a/"], ["/a", "/a/x"]),
    ],
)
def test_double_star_inside_a_pattern_and_a_trailing_slash(
    pattern: str, matching: list[str], not_matching: list[str]
) -> None:
    compiled = compile_path_pattern(pattern)
    assert [path for path in matching if not compiled.match(path)] == []
    assert [path for path in not_matching if compiled.match(path)] == []
