"""Access levels: named rule sets of methods and path patterns, compiled once at start-up.

A pattern is a path of segments where `*` matches one non-empty segment (or part of one, as in `v*`) and `**`
matches any number of segments, including none; a pattern matches with or without a trailing slash, as
routers that are not strict about slashes route both. Rules judge the canonical path of request_target.py,
decoded, which is also the path forwarded upstream: `/api/%75sers` and `/api/./x/../users` meet the rule for
`/api/users` and reach the upstream as `/api/users`.

Case (`access_rule_case`): many upstreams route without regard to case (Express by default, ASP.NET), so by
default a deny rule matches any case (`/API/Users` cannot dodge a deny of `/api/users/**`) while an allow rule
matches only the case it is written in (an allow never opens more than it says on an upstream that does care).
Likewise a deny rule's literal segment matches with any `.suffix` (`/api/users.json`: Rails routes it as
`/api/users` by default), while an allow rule's matches only as written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ALL_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "TRACE", "CONNECT"})
_METHOD_PATTERN = re.compile(r"[A-Z]{1,20}")
_PATTERN_SEGMENT = re.compile(r"[^/?#]*")


class AccessLevelConfigError(ValueError):
    pass


# How rules treat case (the `access_rule_case` setting): which of deny and allow rules ignore it.
RULE_CASES = {
    "deny_any_case": (True, False),  # the default: deny ignores case, allow matches the case written
    "exact": (False, False),  # only for upstreams that route case-sensitively
    "any_case": (True, True),  # only for upstreams that ignore case: an allow then admits /API/PUBLIC/x too
}


def compile_path_pattern(pattern: str, *, any_suffix: bool = False) -> re.Pattern[str]:
    """`any_suffix` (deny rules): a literal segment also matches with a `.suffix`, as many routers read it
    (Rails' `(.:format)` on every route by default, Spring's suffix pattern match, IIS dropping trailing dots):
    `/api/users/**` then matches `/api/users.json` and `/api/users./42`."""
    if not pattern.startswith("/"):
        raise AccessLevelConfigError(f"path pattern {pattern!r} must start with '/'")
    parts = ["^"]
    segments = pattern[1:].split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if not _PATTERN_SEGMENT.fullmatch(segment):
            raise AccessLevelConfigError(f"path pattern {pattern!r} has an invalid segment {segment!r}")
        if segment == "**":
            # Any number of whole segments: "/a/**" matches "/a", "/a/", "/a/b/c".
            parts.append("(?:/.*)?" if last else "(?:/[^/]*)*")
            continue
        if "**" in segment:
            raise AccessLevelConfigError(f"path pattern {pattern!r}: '**' must be a whole segment")
        if segment == "*":
            parts.append("/[^/]+")  # a whole segment, never an empty one: "/a/*" does not match "/a/"
        else:
            parts.append("/" + "[^/]*".join(re.escape(piece) for piece in segment.split("*")))
            if any_suffix and segment:
                parts.append(r"(?:\.[^/]*)?")
        if last and segment:
            parts.append("/?")
    parts.append("$")
    return re.compile("".join(parts))


@dataclass(frozen=True, slots=True)
class Rule:
    methods: frozenset[str]
    patterns: tuple[str, ...]
    _compiled: re.Pattern[str]

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and self._compiled.match(path) is not None


@dataclass(frozen=True, slots=True)
class AccessLevel:
    """Allowed when some `allow` rule matches and no `deny` rule does."""

    name: str
    description: str
    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]
    max_body_bytes: int | None = None  # None: the global max_body_bytes setting

    def permits(self, method: str, normalized_path: str) -> bool:
        for rule in self.deny:
            if rule.matches(method, normalized_path):
                return False
        for rule in self.allow:
            if rule.matches(method, normalized_path):
                return True
        return False


def _parse_rule(level: str, where: str, raw: Any, *, ignore_case: bool, any_suffix: bool = False) -> Rule:
    context = f"access_levels.{level}.{where}"
    if not isinstance(raw, Mapping):
        raise AccessLevelConfigError(f"{context}: each rule is a table with 'methods' and 'paths'")
    unknown = set(raw) - {"methods", "paths"}
    if unknown:
        raise AccessLevelConfigError(f"{context}: unknown key(s) {sorted(unknown)}")
    methods_raw = raw.get("methods", ["*"])
    paths = raw.get("paths")
    if not isinstance(methods_raw, list) or not all(isinstance(m, str) for m in methods_raw) or not methods_raw:
        raise AccessLevelConfigError(f"{context}.methods must be a non-empty list of HTTP methods or '*'")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise AccessLevelConfigError(f"{context}.paths must be a non-empty list of path patterns")
    methods: set[str] = set()
    for method in methods_raw:
        upper = method.upper()
        if upper == "*":
            methods |= ALL_METHODS
        elif _METHOD_PATTERN.fullmatch(upper):
            methods.add(upper)
        else:
            raise AccessLevelConfigError(f"{context}.methods: {method!r} is not an HTTP method")
    try:
        compiled = re.compile(
            "|".join(f"(?:{compile_path_pattern(p, any_suffix=any_suffix).pattern})" for p in paths), re.IGNORECASE if ignore_case else 0
        )
    except AccessLevelConfigError as error:
        raise AccessLevelConfigError(f"{context}: {error}") from None
    return Rule(frozenset(methods), tuple(paths), compiled)


def parse_access_levels(raw: Any, *, rule_case: str = "deny_any_case") -> dict[str, AccessLevel]:
    """Validate and compile the `[access_levels]` table of the config; `rule_case` is one of RULE_CASES."""
    deny_ignores_case, allow_ignores_case = RULE_CASES[rule_case]
    if not isinstance(raw, Mapping) or not raw:
        raise AccessLevelConfigError("access_levels must define at least one level")
    levels: dict[str, AccessLevel] = {}
    for name, body in raw.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name):
            raise AccessLevelConfigError(f"access level name {name!r} must be lower_snake_case")
        if not isinstance(body, Mapping):
            raise AccessLevelConfigError(f"access_levels.{name} must be a table")
        unknown = set(body) - {"description", "allow", "deny", "max_body_bytes"}
        if unknown:
            raise AccessLevelConfigError(f"access_levels.{name}: unknown key(s) {sorted(unknown)}")
        allow_raw = body.get("allow")
        if not isinstance(allow_raw, list) or not allow_raw:
            raise AccessLevelConfigError(f"access_levels.{name}.allow must list at least one rule")
        deny_raw = body.get("deny", [])
        if not isinstance(deny_raw, list):
            raise AccessLevelConfigError(f"access_levels.{name}.deny must be a list of rules")
        description = body.get("description", "")
        if not isinstance(description, str):
            raise AccessLevelConfigError(f"access_levels.{name}.description must be a string")
        max_body = body.get("max_body_bytes")
        if max_body is not None and (isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 0):
            raise AccessLevelConfigError(f"access_levels.{name}.max_body_bytes must be a whole number of bytes")
        levels[name] = AccessLevel(
            name=name,
            description=description,
            max_body_bytes=max_body,
            allow=tuple(_parse_rule(name, "allow", rule, ignore_case=allow_ignores_case) for rule in allow_raw),
            deny=tuple(
                _parse_rule(name, "deny", rule, ignore_case=deny_ignores_case, any_suffix=True) for rule in deny_raw
            ),
        )
    return levels

