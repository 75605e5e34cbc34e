"""No router behind the gateway runs a handler that the token's level forbids, whatever the target says.

Each router of tests/routers/servers.py (Werkzeug/Flask, Starlette on uvicorn, aiohttp, Express 4, emulated
Tomcat/Spring and ASP.NET Core) serves the same routes behind a real gateway with the default access levels.
A corpus of hostile targets (every ambiguity class the gateway knows of, and hypothesis-generated mixes of
separators, dot segments, escapes and case) is sent, byte for byte, with a token of every level and with
methods that read and write. Whenever a handler runs, the router names the resource it served; the test fails
if that level does not permit that method on that resource.
"""

from __future__ import annotations

import asyncio
import functools
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gateway.access_levels import AccessLevel
from gateway.settings import load_settings
from tests.conftest import Gateway, GatewayFactory
from tests.routers.servers import ROUTERS, express_available

# Every level with a method that reads and one that writes (a GET is all that restricted_read_only may send).
PROBES = [(level, method) for level in ("administrative", "managing_editorial", "editorial", "read_only",
                                        "restricted_read_only") for method in ("GET", "DELETE")]

# Forbidden to some level: users (managing_editorial), admin (editorial), a space's settings, any write.
FORBIDDEN = ["/api/users", "/api/users/42", "/api/admin/keys", "/api/spaces/3/settings"]
ALLOWED = ["/api/public/x", "/api/branding"]
# {f} is a forbidden path without its leading "/api/" ("users/42"), {a} an allowed one ("/api/public/x").
TRICKS = [
    "/api/{f}", "{a}/../../{f}", "{a}/..%2F..%2F{f}", "{a}/%2e%2e/%2e%2e/{f}", "{a}/.%2E/.%2e/{f}",
    "{a}%2F..%2F..%2F{f}", "{a}/..%5C..%5C{f}", "{a}\\..\\..\\{f}", "{a}/..;/..;/{f}", "{a};/../../{f}",
    "/api/{f};jsessionid=1", "/api/{f};x=/../../..{a}", "/api/{f}#/../../..{a}", "/api/{f}?#{a}",
    "{a}#/../../{f}", "{a}/%252e%252e/%252e%252e/{f}", "{a}/%252e%252e%252f%252e%252e%252f{f}",
    "{a}/%25%32%65%25%32%65/{f}", "/API/{F}", "/Api/{f}", "/api/{F}", "/%61pi/{f}", "/api/%{hex}",
    "//api//{f}", "/api/{f}/", "/api/{f}//", "/api/./{f}", "/api/{f}/.", "/api/{f}/x/..", "/./api/{f}",
    "/api/{f}%00", "/api/{f}%00{a}", "/api/{f}%20", "/api/{f}.", "/api/{f}.json", "/api/{f}%3B", "/api/{f}%2F",
    "/api/{f}%23{a}", "/api/{f}%3F{a}", "/../api/{f}", "{a}/../../../{f}", "/api/{sf}", "/api/{ki}",
    "/api/{f}?_method=GET", "{a}?/../../{f}", "/api/{f}\\", "/api/{f}%5C",
]


def _expand(trick: str, forbidden: str, allowed: str) -> str:
    rest = forbidden.removeprefix("/api/")
    return trick.format(
        f=rest,
        F=rest.upper(),
        a=allowed,
        hex="".join(char if char == "/" else f"%{ord(char):02x}" for char in rest)[1:],  # '75%73%65...'
        sf=rest.replace("s", "%C5%BF", 1),  # 'ſ': upper-cases to 'S'
        ki=rest.replace("k", "%E2%84%AA", 1),  # the Kelvin sign: lower-cases to 'k'
    )


def _fixed_corpus() -> list[bytes]:
    targets = {
        _expand(trick, forbidden, allowed).encode()
        for trick in TRICKS
        for forbidden in FORBIDDEN
        for allowed in ALLOWED[:1]
    } | {trick.format(f="x", F="X", a="/api/branding", hex="78", sf="x", ki="x").encode() for trick in TRICKS}
    return sorted(targets)


PIECES = ["/", "//", ".", "..", "%2e", "%2E%2e", ".%2e", "%2f", "%2F", "%5c", "\\", ";", ";x", "%3b", "#", "?",
          "%25", "%252f", "%252e", "%00", "%c5%bf", "api", "API", "Api", "users", "USERS", "u%73ers", "public",
          "x", "42", "admin", "spaces", "3", "settings", "groups", "news", "branding", "posts", "%20", "~"]


@functools.cache
def _generated_corpus() -> list[bytes]:
    """Hypothesis-generated mixes of the pieces above, deterministic (derandomized), a few hundred at most."""
    found: set[bytes] = set()

    @settings(
        max_examples=150,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=12))
    def collect(pieces: list[str]) -> None:
        found.add(("/" + "".join(pieces)).encode())

    collect()
    return sorted(found)


@functools.cache
def _oracle() -> dict[str, AccessLevel]:
    """The default levels as written, case-sensitive: the resources a router names are in the routes' case."""
    return dict(load_settings(environ={}, overrides={"access_rule_case": "exact"}).access_levels)


async def _send(port: int, method: str, target: bytes, token: str) -> tuple[int, dict[str, str]]:
    """One request, byte for byte, on its own connection: the status and the headers of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            method.encode() + b" " + target + b" HTTP/1.1\r\nHost: gateway.test\r\nAuthorization: Bearer "
            + token.encode() + b"\r\nConnection: close\r\n\r\n"
        )
        reply = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    head = reply.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    status = int(head[0].split(" ")[1]) if head[0].startswith("HTTP/") else 0
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


@pytest.mark.parametrize("router", list(ROUTERS))
async def test_no_forbidden_handler_runs_behind_the_gateway(router: str, start_gateway: GatewayFactory) -> None:
    if router == "express" and (why := express_available()) is not None:
        pytest.skip(why)
    corpus = sorted({*_fixed_corpus(), *_generated_corpus()})
    async with ROUTERS[router]() as upstream_url:
        gateway: Gateway = await start_gateway(planes=("proxy", "admin"), upstream=upstream_url)
        tokens = {level: (await gateway.create_token(access_level=level))["token"] for level, _ in PROBES}
        port = gateway.proxy.server.port
        assert port is not None
        oracle = _oracle()
        ran: dict[str, int] = {}
        bypasses: list[str] = []
        failures: list[str] = []
        limit = asyncio.Semaphore(8)

        async def probe(level: str, method: str, target: bytes) -> bool:
            """Whether the gateway forwarded the target (anything but its own 400 for the target's form)."""
            async with limit:
                status, headers = await _send(port, method, target, tokens[level])
            if status >= 500 or status == 0:
                failures.append(f"{level} {method} {target!r}: {status}")
            if "x-route-resource" in headers:
                resource = unquote(headers["x-route-resource"])
                ran[level] = ran.get(level, 0) + 1
                if headers.get("x-route-method") != method or not oracle[level].permits(method, resource):
                    bypasses.append(f"{level}: {method} {target!r} ran {headers.get('x-route-method')} {resource}")
            return not (status == 400 and headers.get("content-type") == "application/problem+json")

        # A target whose form the gateway refuses (400 problem+json, before any level is asked) is refused for
        # every token alike: it is sent once, and the targets that pass are sent with every level and method.
        first, *others = PROBES
        passed = await asyncio.gather(*(probe(*first, target) for target in corpus))
        forwarded = [target for target, ok in zip(corpus, passed) if ok]
        await asyncio.gather(*(probe(level, method, target) for level, method in others for target in forwarded))
    assert bypasses == []
    assert failures == []
    # The corpus reaches real handlers, for the most and the least privileged level alike.
    assert ran.get("administrative", 0) > 50 and ran.get("restricted_read_only", 0) > 3, ran
