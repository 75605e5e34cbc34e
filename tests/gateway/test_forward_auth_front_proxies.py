"""Forward-auth behind a real nginx (`auth_request`) and a real Caddy (`forward_auth`), in front of a real
upstream: every lifecycle operation holds through them, and a hostile target is judged as the proxy judges it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.token_format import issue_token
from tests.conftest import ForwardAuth, StartForwardAuth, Upstream, send_raw
from tests.front_proxies import FrontProxy, start_caddy, start_nginx

STARTERS: dict[str, Callable[..., FrontProxy]] = {"nginx": start_nginx, "caddy": start_caddy}


class Fronted:
    """The operator's proxy, with the gateway's forward-auth port behind it."""

    def __init__(self, front: FrontProxy, forward_auth: ForwardAuth, session: aiohttp.ClientSession) -> None:
        self.front = front
        self.forward_auth = forward_auth
        self.gateway = forward_auth.gateway
        self.session = session

    async def call(self, token: str | None, path: str = "/api/posts", method: str = "GET", **kwargs: Any) -> tuple[int, bytes]:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        url = URL(self.front.url + path, encoded=True)
        async with self.session.request(method, url, headers=headers, **kwargs) as response:
            return response.status, await response.read()


@pytest.fixture(params=["nginx", "caddy"])
async def fronted(
    request: pytest.FixtureRequest, start_forward_auth: StartForwardAuth, upstream: Upstream, tmp_path: Path
) -> AsyncIterator[Fronted]:
    kind = str(request.param)
    forward_auth = await start_forward_auth(forward_auth_convention=kind, trusted_proxies=["127.0.0.1"])
    front = STARTERS[kind](tmp_path / kind, auth_port=forward_auth.port, upstream_port=upstream.server.port)
    session = aiohttp.ClientSession()
    try:
        yield Fronted(front, forward_auth, session)
    finally:
        await session.close()
        front.stop()


async def test_an_allowed_request_reaches_the_upstream_with_the_identity_and_without_the_token(
    fronted: Fronted, upstream: Upstream
) -> None:
    created = await fronted.gateway.create_token(access_level="editorial")
    spoofed = {"X-Gateway-Token-Id": "someone-else", "X-Gateway-Access-Level": "administrative"}
    status, body = await fronted.call(created["token"], "/api/posts/1?page=2", "DELETE", headers=spoofed)
    assert status == 200, body
    seen = upstream.last
    assert seen["method"] == "DELETE" and seen["raw_path"] == "/api/posts/1?page=2"
    assert seen["headers"]["X-Gateway-Token-Id"] == created["id"]
    assert seen["headers"]["X-Gateway-Access-Level"] == "editorial"
    assert "Authorization" not in seen["headers"]
    assert created["token"] not in json.dumps(seen)


async def test_each_lifecycle_operation_holds_through_the_front_proxy(fronted: Fronted, upstream: Upstream) -> None:
    gateway = fronted.gateway
    created = await gateway.create_token(access_level="editorial")
    token, token_id = created["token"], created["id"]
    assert (await fronted.call(token))[0] == 200
    assert (await fronted.call(None))[0] == 401
    reached = len(upstream.requests)

    assert (await gateway.admin_call("POST", f"/v1/tokens/{token_id}/disable"))[0] == 200
    assert (await fronted.call(token))[0] == 401
    assert (await gateway.admin_call("POST", f"/v1/tokens/{token_id}/enable"))[0] == 200
    assert (await fronted.call(token))[0] == 200

    assert (await gateway.admin_call("PATCH", f"/v1/tokens/{token_id}", json={"access_level": "read_only"}))[0] == 200
    assert (await fronted.call(token, "/api/posts/1", "DELETE"))[0] == 403
    assert (await fronted.call(token, "/api/posts/1"))[0] == 200
    assert (await gateway.admin_call("PATCH", f"/v1/tokens/{token_id}", json={"allowed_ip_ranges": ["10.0.0.0/8"]}))[0] == 200
    assert (await fronted.call(token))[0] == 403
    assert (await gateway.admin_call("PATCH", f"/v1/tokens/{token_id}", json={"allowed_ip_ranges": ["127.0.0.1/32"]}))[0] == 200
    assert (await fronted.call(token))[0] == 200

    status, rotated = await gateway.admin_call("POST", f"/v1/tokens/{token_id}/rotate", json={})
    assert status == 200
    assert (await fronted.call(token))[0] == 401
    assert (await fronted.call(rotated["token"]))[0] == 200

    assert (await gateway.admin_call("DELETE", f"/v1/tokens/{token_id}"))[0] in (200, 204)
    assert (await fronted.call(rotated["token"]))[0] == 401
    # Only the allowed requests reached the upstream: 4 after the first.
    assert len(upstream.requests) - reached == 4


@pytest.mark.parametrize(
    "target",
    [
        "/api/admin/x",
        "/api/posts/%2e%2e/admin/x",
        "/api/posts/%2E%2E%2Fadmin/x",
        "/api/%61dmin/x",
        "/api/posts/1?_method=DELETE",
        "/api/posts/1?%5Fmethod=DELETE",
        "/api/posts/1",
    ],
)
async def test_a_hostile_target_through_the_front_proxy_is_judged_as_the_proxy_judges_it(
    fronted: Fronted, upstream: Upstream, target: str
) -> None:
    token = (await fronted.gateway.create_token(access_level="editorial"))["token"]
    proxy_status, _ = await send_raw(
        fronted.gateway.proxy,
        f"DELETE {target} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode(),
    )
    before = len(upstream.requests)
    status, _ = await fronted.call(token, target, "DELETE")
    assert status == proxy_status, target
    if status == 200:
        assert upstream.last["raw_path"] == target  # forwarded as judged
    else:
        assert len(upstream.requests) == before


@pytest.mark.parametrize("kind", ["nginx", "caddy"])
async def test_a_refusal_keeps_its_status_and_www_authenticate_through_the_front_proxy(
    start_forward_auth: StartForwardAuth, upstream: Upstream, tmp_path: Path, kind: str
) -> None:
    forward_auth = await start_forward_auth(forward_auth_convention=kind, failure_limit_per_source=1)
    front = STARTERS[kind](tmp_path / kind, auth_port=forward_auth.port, upstream_port=upstream.server.port)
    created = await forward_auth.gateway.create_token()
    wrong = [str(issue_token("gw", created["id"])) for _ in range(2)]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{front.url}/api/posts") as missing:
                assert missing.status == 401
                assert missing.headers["WWW-Authenticate"].startswith('Bearer realm="gateway"')
                if kind == "caddy":
                    assert (await missing.json(content_type=None))["code"] == "missing_credentials"
            statuses = []
            for secret in wrong:
                async with session.get(f"{front.url}/api/posts", headers={"Authorization": f"Bearer {secret}"}) as r:
                    statuses.append(r.status)
            assert statuses == [401, 429]
        assert len(upstream.requests) == 0
    finally:
        front.stop()
