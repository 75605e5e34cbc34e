"""Step 3: the client address, its allowed ranges, and the X-Forwarded-For rule."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient

from gateway.proxy_app import create_proxy_app
from tests.conftest import Gateway, GatewayFactory, ProxyTestServer, Upstream


async def _forbidden_code(response: object) -> str:
    body = await response.json()  # type: ignore[attr-defined]
    return str(body["code"])


async def test_request_from_outside_the_ranges_gets_403_ip_not_allowed(gateway: Gateway) -> None:
    token = (await gateway.create_token(allowed_ip_ranges=["10.0.0.0/8", "2001:db8::/32"]))["token"]
    response = await gateway.call(token)
    assert response.status == 403
    assert response.content_type == "application/problem+json"
    assert await _forbidden_code(response) == "ip_not_allowed"


async def test_request_from_inside_the_ranges_is_forwarded(gateway: Gateway) -> None:
    token = (await gateway.create_token(allowed_ip_ranges=["10.0.0.0/8", "127.0.0.0/8"]))["token"]
    assert (await gateway.call(token)).status == 200


async def test_no_ranges_means_any_address(gateway: Gateway) -> None:
    token = (await gateway.create_token(allowed_ip_ranges=[]))["token"]
    assert (await gateway.call(token)).status == 200


async def test_ipv6_client_is_matched_against_ipv6_ranges(gateway: Gateway) -> None:
    allowed = (await gateway.create_token(allowed_ip_ranges=["::1"]))["token"]
    other = (await gateway.create_token(allowed_ip_ranges=["2001:db8::/32", "127.0.0.1"]))["token"]
    async with TestClient(ProxyTestServer(create_proxy_app(gateway.core), host="::1")) as client:
        ok = await client.get("/api/posts", headers={"Authorization": f"Bearer {allowed}"})
        refused = await client.get("/api/posts", headers={"Authorization": f"Bearer {other}"})
        assert ok.status == 200
        assert refused.status == 403
        assert await _forbidden_code(refused) == "ip_not_allowed"


async def test_forwarded_for_from_an_untrusted_peer_changes_nothing(gateway: Gateway, upstream: Upstream) -> None:
    token = (await gateway.create_token(allowed_ip_ranges=["203.0.113.0/24"]))["token"]
    response = await gateway.call(
        token, headers={"X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.7", "Forwarded": "for=1.2.3.4"}
    )
    assert response.status == 403
    loopback = (await gateway.create_token())["token"]
    assert (await gateway.call(loopback, headers={"X-Forwarded-For": "203.0.113.7", "X-Real-IP": "1.1.1.1"})).status == 200
    assert upstream.last["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert "X-Real-IP" not in upstream.last["headers"]
    assert "Forwarded" not in upstream.last["headers"]


async def test_forwarded_for_from_a_trusted_proxy_gives_the_client_address(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await start_gateway(trusted_proxies="127.0.0.0/8, 10.0.0.0/8")
    token = (await gateway.create_token(allowed_ip_ranges=["203.0.113.0/24"]))["token"]
    # Right to left, past trusted hops: 10.0.0.2 is one of our proxies, 203.0.113.7 is the client.
    response = await gateway.call(token, headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.7, 10.0.0.2"})
    assert response.status == 200
    # 198.51.100.1 is the client's own claim: it is not passed on.
    assert upstream.last["headers"]["X-Forwarded-For"] == "203.0.113.7, 10.0.0.2, 127.0.0.1"
    refused = await gateway.call(token, headers={"X-Forwarded-For": "203.0.113.7, 198.51.100.1"})
    assert refused.status == 403


async def test_garbage_beyond_the_first_untrusted_hop_changes_nothing(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(trusted_proxies="127.0.0.1")
    token = (await gateway.create_token(allowed_ip_ranges=["203.0.113.0/24"]))["token"]
    assert (await gateway.call(token, headers={"X-Forwarded-For": "not-an-ip, 203.0.113.9"})).status == 200


@pytest.mark.parametrize(
    ("forwarded_for", "client"),
    [
        ("203.0.113.9:5060", "203.0.113.9"),
        ("198.51.100.1, 203.0.113.9:443", "203.0.113.9"),
        ("[2001:db8::9]:443", "2001:db8::9"),
        ("203.0.113.9, , ", "203.0.113.9"),
    ],
)
async def test_a_hop_with_a_port_or_empty_elements_gives_the_client_behind_the_proxy(
    start_gateway: GatewayFactory, forwarded_for: str, client: str
) -> None:
    gateway = await start_gateway(trusted_proxies="127.0.0.0/8")
    proxies_only = (await gateway.create_token(allowed_ip_ranges=["127.0.0.0/8"]))["token"]
    clients_only = (await gateway.create_token(allowed_ip_ranges=[client]))["token"]

    refused = await gateway.call(proxies_only, headers={"X-Forwarded-For": forwarded_for})
    allowed = await gateway.call(clients_only, headers={"X-Forwarded-For": forwarded_for})

    assert (refused.status, await _forbidden_code(refused)) == (403, "ip_not_allowed")
    assert client in (await refused.json())["detail"]
    assert allowed.status == 200


@pytest.mark.parametrize(
    "forwarded_for", ["203.0.113.9, ::1]", "203.0.113.9, [::1", "garbage", "203.0.113.9:", "unknown", "1.2.3.4:80:90"]
)
async def test_an_unreadable_hop_from_a_trusted_proxy_matches_no_range(
    start_gateway: GatewayFactory, upstream: Upstream, forwarded_for: str
) -> None:
    """The last readable hop would be the trusted proxy itself: a token limited to the proxies' network must
    not accept whoever is behind them. The address is unknown; a token without ranges still works."""
    gateway = await start_gateway(trusted_proxies="127.0.0.0/8, ::1")
    proxies_only = (await gateway.create_token(allowed_ip_ranges=["127.0.0.0/8", "::1"]))["token"]
    anywhere = (await gateway.create_token(allowed_ip_ranges=[]))["token"]

    refused = await gateway.call(proxies_only, headers={"X-Forwarded-For": forwarded_for})
    allowed = await gateway.call(anywhere, headers={"X-Forwarded-For": forwarded_for})

    assert (refused.status, await _forbidden_code(refused)) == (403, "ip_not_allowed")
    assert allowed.status == 200
    assert len(upstream.requests) == 1


async def test_ipv6_and_mapped_addresses_in_forwarded_for(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(trusted_proxies="127.0.0.1")
    v6 = (await gateway.create_token(allowed_ip_ranges=["2001:db8::/32"]))["token"]
    v4 = (await gateway.create_token(allowed_ip_ranges=["10.0.0.0/8"]))["token"]
    assert (await gateway.call(v6, headers={"X-Forwarded-For": "2001:db8::5"})).status == 200
    assert (await gateway.call(v6, headers={"X-Forwarded-For": "[2001:db8::5]"})).status == 200
    assert (await gateway.call(v6, headers={"X-Forwarded-For": "2001:db9::5"})).status == 403
    # IPv4-mapped IPv6 matches IPv4 ranges.
    assert (await gateway.call(v4, headers={"X-Forwarded-For": "::ffff:10.1.2.3"})).status == 200
    assert (await gateway.call(v4, headers={"X-Forwarded-For": "::ffff:11.1.2.3"})).status == 403


async def test_editing_ranges_holds_on_the_next_request(gateway: Gateway) -> None:
    created = await gateway.create_token()
    assert (await gateway.call(created["token"])).status == 200
    status, _ = await gateway.admin_call("PATCH", f"/v1/tokens/{created['id']}", json={"allowed_ip_ranges": ["10.0.0.0/8"]})
    assert status == 200
    assert (await gateway.call(created["token"])).status == 403
    status, _ = await gateway.admin_call("PATCH", f"/v1/tokens/{created['id']}", json={"allowed_ip_ranges": []})
    assert (await gateway.call(created["token"])).status == 200
