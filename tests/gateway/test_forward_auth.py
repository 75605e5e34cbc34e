"""Forward-auth: the proxy's decision answered on its own port, in each calling proxy's convention."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.token_format import issue_token
from tests.conftest import ForwardAuth, StartForwardAuth, send_raw


async def _code(response: aiohttp.ClientResponse) -> str:
    return str((await response.json(content_type=None))["code"])


async def test_allowed_request_gets_200_with_identity_headers_and_no_body(forward_auth: ForwardAuth) -> None:
    created = await forward_auth.gateway.create_token(access_level="editorial")
    response = await forward_auth.nginx(created["token"], "POST", "/api/posts/7/comments")
    assert response.status == 200
    assert response.headers["X-Gateway-Token-Id"] == created["id"]
    assert response.headers["X-Gateway-Access-Level"] == "editorial"
    assert response.headers["Content-Length"] == "0"
    assert response.headers["Cache-Control"] == "no-store"


async def test_the_access_log_names_the_client_judged_not_the_proxy_in_front(
    start_forward_auth: StartForwardAuth,
) -> None:
    forward_auth = await start_forward_auth(trusted_proxies=["127.0.0.1"])
    created = await forward_auth.gateway.create_token()
    response = await forward_auth.nginx(created["token"], "GET", "/api/posts", **{"X-Forwarded-For": "203.0.113.9"})
    assert response.status == 200
    lines = [line for line in forward_auth.gateway.access_lines() if created["id"] in line]
    assert len(lines) == 1 and " 203.0.113.9 " in f" {lines[0]} " and "127.0.0.1" not in lines[0]


async def test_missing_token_gets_401_problem_with_www_authenticate(forward_auth: ForwardAuth) -> None:
    response = await forward_auth.nginx(None, "GET", "/api/posts")
    assert response.status == 401
    assert response.content_type == "application/problem+json"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await _code(response) == "missing_credentials"
    assert "X-Gateway-Token-Id" not in response.headers


async def test_level_is_judged_on_the_original_method_and_uri_not_the_auth_request(
    forward_auth: ForwardAuth,
) -> None:
    token = (await forward_auth.gateway.create_token(access_level="read_only"))["token"]
    assert (await forward_auth.nginx(token, "GET", "/api/users/1")).status == 200
    refused = await forward_auth.nginx(token, "DELETE", "/api/users/1")
    assert refused.status == 403
    assert await _code(refused) == "insufficient_access_level"


@pytest.mark.parametrize(
    "target",
    [
        "/api/admin/x",
        "/api/posts/../admin/x",
        "/api/posts/%2e%2e/admin/x",
        "/api/%61dmin/x",
        "/api/posts//..//admin/x",
        "/api/posts/1?_method=DELETE",
        "/api/posts/1?%5Fmethod=DELETE",
        "/api/posts/1",
        "/api/posts/1/",
        "//api/admin",
        "http://upstream/api/posts",
        "*",
    ],
)
async def test_hostile_targets_are_judged_as_the_proxy_judges_them(forward_auth: ForwardAuth, target: str) -> None:
    token = (await forward_auth.gateway.create_token(access_level="editorial"))["token"]
    proxy_status, proxy_reply = await send_raw(
        forward_auth.gateway.proxy,
        f"DELETE {target} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode(),
    )
    answer = await forward_auth.nginx(token, "DELETE", target)
    assert answer.status == proxy_status, target
    if proxy_status != 200:
        assert await _code(answer) == json.loads(proxy_reply.partition(b"\r\n\r\n")[2])["code"], target


async def test_a_target_with_a_space_or_control_character_is_refused(forward_auth: ForwardAuth) -> None:
    token = (await forward_auth.gateway.create_token())["token"]
    for target in ("/api/posts HTTP/1.1", "/api/\tposts"):
        response = await forward_auth.nginx(token, "GET", target)
        assert response.status == 400
        assert await _code(response) == "invalid_request_target"


CREATE_ONLY = """
[access_levels.create_only]
allow = [{ methods = ["GET"], paths = ["/**"] }, { methods = ["POST"], paths = ["/api/posts"] }]
"""


@pytest.mark.parametrize("override", [True, False], ids=["body_method_override", "no body_method_override"])
async def test_a_post_is_judged_as_carrying_a_body_the_auth_request_cannot_see(
    start_forward_auth: StartForwardAuth, tmp_path: Path, override: bool
) -> None:
    config = tmp_path / "levels.toml"
    config.write_text(CREATE_ONLY)
    forward_auth = await start_forward_auth(config_path=config, body_method_override=override)
    token = (await forward_auth.gateway.create_token(access_level="create_only"))["token"]
    response = await forward_auth.nginx(token, "POST", "/api/posts")
    if override:
        assert response.status == 403
        assert await _code(response) == "insufficient_access_level"
    else:
        assert response.status == 200


async def test_missing_or_repeated_original_request_headers_get_400(forward_auth: ForwardAuth) -> None:
    token = (await forward_auth.gateway.create_token())["token"]
    auth = {"Authorization": f"Bearer {token}"}
    missing = await forward_auth.ask(headers={**auth, "X-Original-URI": "/api/posts"})
    assert missing.status == 400
    assert await _code(missing) == "forward_auth_request_incomplete"
    status, reply = await send_raw(
        _client_for(forward_auth),
        b"GET /auth HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + token.encode()
        + b"\r\nX-Original-Method: GET\r\nX-Original-URI: /api/public\r\nX-Original-URI: /api/admin\r\n"
        + b"Connection: close\r\n\r\n",
    )
    assert status == 400 and b"forward_auth_request_incomplete" in reply
    bad_method = await forward_auth.nginx(token, "get /x", "/api/posts")
    assert bad_method.status == 400
    assert await _code(bad_method) == "bad_request"


class _Port:
    """What send_raw needs of a client: the port to connect to."""

    def __init__(self, port: int) -> None:
        self.server = self
        self.port = port


def _client_for(forward_auth: ForwardAuth) -> Any:
    return _Port(forward_auth.port)


async def test_nginx_convention_ignores_a_forwarded_method_and_refuses_a_forwarded_uri_a_client_could_send(
    forward_auth: ForwardAuth,
) -> None:
    token = (await forward_auth.gateway.create_token(access_level="read_only"))["token"]
    response = await forward_auth.nginx(token, "DELETE", "/api/posts/1", **{"X-Forwarded-Method": "GET"})
    assert response.status == 403
    assert await _code(response) == "insufficient_access_level"
    response = await forward_auth.nginx(token, "GET", "/api/posts/1", **{"X-Forwarded-Uri": "/api/users"})
    assert response.status == 400
    assert await _code(response) == "override_header"


@pytest.mark.parametrize("convention", ["traefik", "caddy"])
async def test_forwarded_convention_reads_x_forwarded_method_and_uri_only(
    start_forward_auth: StartForwardAuth, convention: str
) -> None:
    forward_auth = await start_forward_auth(forward_auth_convention=convention)
    token = (await forward_auth.gateway.create_token(access_level="read_only"))["token"]
    auth = {"Authorization": f"Bearer {token}"}
    allowed = await forward_auth.ask(
        headers={**auth, "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/api/posts?page=2",
                 "X-Forwarded-Host": "api.example", "X-Forwarded-Proto": "https"}
    )
    assert allowed.status == 200
    # Traefik copies every client header to the auth request: a client's own X-Original-* must not count.
    refused = await forward_auth.ask(
        headers={**auth, "X-Forwarded-Method": "DELETE", "X-Forwarded-Uri": "/api/posts/1",
                 "X-Original-Method": "GET"}
    )
    assert refused.status == 403
    assert await _code(refused) == "insufficient_access_level"
    incomplete = await forward_auth.ask(headers={**auth, "X-Original-Method": "GET"})
    assert incomplete.status == 400
    assert await _code(incomplete) == "forward_auth_request_incomplete"


async def test_envoy_convention_judges_the_auth_requests_own_method_and_path(
    start_forward_auth: StartForwardAuth,
) -> None:
    forward_auth = await start_forward_auth(forward_auth_convention="envoy", forward_auth_path_prefix="/check")
    created = await forward_auth.gateway.create_token(access_level="editorial")
    auth = {"Authorization": f"Bearer {created['token']}"}
    allowed = await forward_auth.ask("DELETE", "/check/api/posts/1", headers=auth)
    assert allowed.status == 200
    assert allowed.headers["X-Gateway-Token-Id"] == created["id"]
    refused = await forward_auth.ask("DELETE", "/check/api/posts/../admin/x", headers=auth)
    assert refused.status == 403
    assert await _code(refused) == "insufficient_access_level"
    outside = await forward_auth.ask("GET", "/checkapi/posts", headers=auth)
    assert outside.status == 400
    assert await _code(outside) == "forward_auth_request_incomplete"
    override = await forward_auth.ask("GET", "/check/api/posts?_method=DELETE", headers=auth)
    assert override.status == 400
    assert await _code(override) == "method_override"


async def test_client_address_comes_from_x_forwarded_for_only_from_a_trusted_proxy(
    start_forward_auth: StartForwardAuth,
) -> None:
    forward_auth = await start_forward_auth(trusted_proxies=["127.0.0.1"])
    token = (await forward_auth.gateway.create_token(allowed_ip_ranges=["203.0.113.0/24"]))["token"]
    inside = await forward_auth.nginx(token, "GET", "/api/posts", **{"X-Forwarded-For": "203.0.113.9"})
    assert inside.status == 200
    outside = await forward_auth.nginx(token, "GET", "/api/posts", **{"X-Forwarded-For": "198.51.100.1"})
    assert outside.status == 403
    assert await _code(outside) == "ip_not_allowed"
    claimed = await forward_auth.nginx(token, "GET", "/api/posts", **{"X-Real-IP": "203.0.113.9"})
    assert claimed.status == 403


async def test_forwarded_for_from_an_untrusted_proxy_is_ignored(forward_auth: ForwardAuth) -> None:
    token = (await forward_auth.gateway.create_token(allowed_ip_ranges=["203.0.113.0/24"]))["token"]
    response = await forward_auth.nginx(token, "GET", "/api/posts", **{"X-Forwarded-For": "203.0.113.9"})
    assert response.status == 403
    assert await _code(response) == "ip_not_allowed"


async def test_wrong_secrets_count_against_the_same_limits_as_on_the_proxy_port(
    start_forward_auth: StartForwardAuth,
) -> None:
    forward_auth = await start_forward_auth(failure_limit_per_source=2)
    created = await forward_auth.gateway.create_token()
    wrong = [str(issue_token("gw", created["id"])) for _ in range(3)]  # valid checksums: they reach argon2
    statuses = [(await forward_auth.nginx(secret, "GET", "/api/posts")).status for secret in wrong[:2]]
    assert statuses == [401, 401]
    limited = await forward_auth.gateway.call(wrong[2])
    assert limited.status == 429


async def test_usage_is_recorded_for_forward_auth_requests(forward_auth: ForwardAuth) -> None:
    created = await forward_auth.gateway.create_token()
    assert (await forward_auth.nginx(created["token"], "GET", "/api/posts")).status == 200
    for _ in range(200):
        status, body = await forward_auth.gateway.admin_call("GET", f"/v1/tokens/{created['id']}")
        if body["last_used_at"] is not None:
            break
        await asyncio.sleep(0.05)
    assert body["last_used_at"] is not None
    assert body["last_used_ip"] == "127.0.0.1"


async def test_forward_auth_runs_without_an_upstream(start_forward_auth: StartForwardAuth) -> None:
    forward_auth = await start_forward_auth(upstream=None)
    created = await forward_auth.gateway.create_token(access_level="read_only")
    response = await forward_auth.nginx(created["token"], "GET", "/api/posts")
    assert response.status == 200
    assert response.headers["X-Gateway-Access-Level"] == "read_only"


async def test_a_disabled_token_is_refused_at_once(forward_auth: ForwardAuth) -> None:
    created = await forward_auth.gateway.create_token()
    assert (await forward_auth.nginx(created["token"], "GET", "/api/posts")).status == 200
    status, _ = await forward_auth.gateway.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    assert status == 200
    refused = await forward_auth.nginx(created["token"], "GET", "/api/posts")
    assert refused.status == 401
    assert await _code(refused) == "token_disabled"


@pytest.mark.parametrize(
    ("target", "canonical"),
    [
        ("/api/users/../posts/1", "/api/posts/1"),
        ("/api/posts//1", "/api/posts/1"),
        ("/api/%70osts/1", "/api/posts/1"),
        ("/api/posts/./1", "/api/posts/1"),
        ("/api/posts/1%3a", "/api/posts/1%3A"),
    ],
)
async def test_an_allowed_target_in_another_spelling_is_refused_as_the_proxy_forwards_it_as_sent(
    forward_auth: ForwardAuth, target: str, canonical: str
) -> None:
    token = (await forward_auth.gateway.create_token(access_level="editorial"))["token"]
    assert (await forward_auth.nginx(token, "DELETE", canonical)).status == 200
    answer = await forward_auth.nginx(token, "DELETE", target)
    assert answer.status == 400
    assert await _code(answer) == "non_canonical_path"
    assert (await forward_auth.nginx(token, "DELETE", canonical + "?next=/../%2F;#x")).status == 400  # '#'
    assert (await forward_auth.nginx(token, "DELETE", canonical + "?next=/../%2F;x")).status == 200


@pytest.mark.parametrize(
    ("convention", "header"),
    [
        ("nginx", "X-HTTP-Method-Override"),
        ("nginx", "X_Original_URL"),
        ("nginx", "X-Forwarded-Uri"),
        ("traefik", "SCRIPT_NAME"),
        ("traefik", "X-Original-URI"),
        ("caddy", "X-Method-Override"),
        ("envoy", "X-Rewrite-URL"),
        ("nginx", "X_Gateway_Token_Id"),
        ("caddy", "x_gateway_access_level"),
    ],
)
async def test_an_auth_request_carrying_a_method_or_path_override_gets_400(
    start_forward_auth: StartForwardAuth, convention: str, header: str
) -> None:
    # The proxy in front forwards the client's headers upstream itself: the gateway cannot drop them there.
    forward_auth = await start_forward_auth(forward_auth_convention=convention, forward_auth_path_prefix="/check")
    token = (await forward_auth.gateway.create_token(access_level="administrative"))["token"]
    original = (
        {}
        if convention == "envoy"
        else {"X-Original-Method": "GET", "X-Original-URI": "/api/posts"}
        if convention == "nginx"
        else {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/api/posts"}
    )
    headers = {"Authorization": f"Bearer {token}", **original}
    target = "/check/api/posts" if convention == "envoy" else "/"
    assert (await forward_auth.ask("GET", target, headers=headers)).status == 200
    refused = await forward_auth.ask("GET", target, headers={**headers, header: "/api/users"})
    assert refused.status == 400
    assert await _code(refused) == "override_header"
