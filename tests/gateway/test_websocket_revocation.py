"""Revocation reaches open WebSocket tunnels: a token change that no longer allows a tunnel closes it with
close code 1008, in one process and on every replica behind Redis; and idle tunnels close."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import websockets
from aiohttp import WSMsgType

from tests.conftest import Gateway, GatewayFactory
from tests.gateway.test_store_down import ruin_the_store
from tests.gateway.test_websocket import StartWs, WsUpstream, bearer, start_ws, ws_upstream, ws_url

__all__ = ["start_ws", "ws_upstream"]  # fixtures


async def _closed_with(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """The close code the client sees, reading whatever arrives until the tunnel ends."""
    while True:
        message = await ws.receive(timeout=15)
        if message.type == WSMsgType.CLOSE:
            return int(message.data)
        if message.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
            return ws.close_code


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (("POST", "/disable", None), "/ws"),
        (("DELETE", "", None), "/ws"),
        (("POST", "/rotate", None), "/ws"),
        (("PATCH", "", {"access_level": "restricted_read_only"}), "/ws"),
        (("PATCH", "", {"allowed_ip_ranges": ["10.0.0.0/8"]}), "/api/public/ws"),
    ],
    ids=["disabled", "deleted", "rotated-without-grace", "level-no-longer-covers", "ranges-no-longer-cover"],
)
async def test_a_token_change_closes_its_open_tunnel_with_1008(
    start_ws: StartWs, change: tuple[str, str, dict[str, Any] | None], path: str
) -> None:
    gateway = await start_ws()
    created = await gateway.create_token(access_level="read_only")
    other = (await gateway.create_token(access_level="read_only"))["token"]
    method, suffix, body = change
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(ws_url(gateway, path), headers=bearer(created["token"]))
        bystander = await session.ws_connect(ws_url(gateway, path), headers=bearer(other))
        await ws.send_str("before")
        assert (await ws.receive(timeout=10)).data == "before"
        kwargs = {} if body is None else {"json": body}
        status, _ = await gateway.admin_call(method, f"/v1/tokens/{created['id']}{suffix}", **kwargs)
        assert status in (200, 204)
        assert await _closed_with(ws) == 1008
        await bystander.send_str("still open")
        assert (await bystander.receive(timeout=10)).data == "still open"
        await bystander.close()


async def test_a_change_that_still_allows_the_tunnel_keeps_it_open(start_ws: StartWs) -> None:
    gateway = await start_ws()
    created = await gateway.create_token(access_level="read_only")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url(gateway), headers=bearer(created["token"])) as ws:
            status, _ = await gateway.admin_call(
                "PATCH", f"/v1/tokens/{created['id']}", json={"access_level": "editorial", "name": "renamed"}
            )
            assert status == 200
            status, _ = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/rotate", json={"grace_seconds": 600})
            assert status == 200
            for n in range(3):  # across more than one sweep of the open tunnels
                await ws.send_str(f"after {n}")
                assert (await ws.receive(timeout=10)).data == f"after {n}"
                await asyncio.sleep(0.5)


async def test_expiry_closes_an_open_tunnel(start_ws: StartWs) -> None:
    gateway = await start_ws()
    expires = (datetime.now(UTC) + timedelta(seconds=2)).isoformat().replace("+00:00", "Z")
    created = await gateway.create_token(expires_at=expires)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(ws_url(gateway), headers=bearer(created["token"]))
        assert await _closed_with(ws) == 1008


@pytest.mark.parametrize("ends", ["expiry", "grace"])
async def test_an_open_tunnel_closes_at_its_token_s_own_deadline_while_the_store_is_down(
    start_ws: StartWs, ends: str
) -> None:
    """The last version known of the token says when it stops: a store outage keeps the tunnel open up to
    then, not past it."""
    gateway = await start_ws(cache_ttl=0.2)
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat().replace("+00:00", "Z")
    created = await gateway.create_token(expires_at=soon if ends == "expiry" else None)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(ws_url(gateway), headers=bearer(created["token"]))
        if ends == "grace":
            status, _ = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/rotate", json={"grace_seconds": 2})
            assert status == 200
        await ws.send_str("before the outage")
        assert (await ws.receive(timeout=10)).data == "before the outage"
        ruin_the_store(gateway)
        await ws.send_str("during the outage")
        assert (await ws.receive(timeout=10)).data == "during the outage"
        assert await _closed_with(ws) == 1008


async def test_an_idle_tunnel_is_closed(start_ws: StartWs, ws_upstream: WsUpstream) -> None:
    gateway = await start_ws(websocket_idle_timeout=1)
    token = (await gateway.create_token())["token"]
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(ws_url(gateway), headers=bearer(token))
        message = await ws.receive(timeout=15)
        assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)


async def test_a_disable_closes_tunnels_on_both_replicas(
    start_gateway: GatewayFactory, redis_url: str, ws_upstream: WsUpstream
) -> None:
    settings: dict[str, Any] = {"redis_url": redis_url, "cache_ttl": 60, "upstream": ws_upstream.url}
    admin = await start_gateway(planes=("admin",), **settings)
    replicas: list[Gateway] = [await start_gateway(planes=("proxy",), **settings) for _ in range(2)]
    created = await admin.create_token()
    token = created["token"]
    async with aiohttp.ClientSession() as session:
        first = await session.ws_connect(ws_url(replicas[0]), headers=bearer(token))
        async with websockets.connect(ws_url(replicas[1]), additional_headers=bearer(token)) as second:
            await first.send_str("one")
            assert (await first.receive(timeout=10)).data == "one"
            await second.send("two")
            assert await asyncio.wait_for(second.recv(), 10) == "two"
            status, _ = await admin.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
            assert status == 200
            assert await _closed_with(first) == 1008
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(second.recv(), 15)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
