"""WebSocket through the proxy: real clients (aiohttp's and the `websockets` package) against a real aiohttp
WebSocket upstream behind the real gateway; refusals, bounds, and revocation closing live tunnels."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import websockets
from aiohttp import WSMsgType, web
from pytest_aiohttp import AiohttpServer

from tests.conftest import Gateway, GatewayFactory, eventually

StartWs = Callable[..., Awaitable[Gateway]]


@dataclass
class WsUpstream:
    url: str
    seen: list[dict[str, str]] = field(default_factory=list)
    open: int = 0


@pytest.fixture
async def ws_upstream(aiohttp_server: AiohttpServer) -> WsUpstream:
    state: list[WsUpstream] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        state[0].seen.append(dict(request.headers))
        ws = web.WebSocketResponse(protocols=("chat",), max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        state[0].open += 1
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    if message.data == "close-me":
                        await ws.close(code=4000, message=b"upstream done")
                        break
                    await ws.send_str(message.data)
                elif message.type == WSMsgType.BINARY:
                    await ws.send_bytes(message.data)
        finally:
            state[0].open -= 1
        return ws

    async def plain(request: web.Request) -> web.Response:
        return web.json_response({"plain": True}, status=418)

    app = web.Application()
    app.router.add_get("/ws", echo)
    app.router.add_get("/api/public/ws", echo)
    app.router.add_get("/teapot", plain)
    server = await aiohttp_server(app)
    state.append(WsUpstream(str(server.make_url("")).rstrip("/")))
    return state[0]


@pytest.fixture
def start_ws(start_gateway: GatewayFactory, ws_upstream: WsUpstream) -> StartWs:
    async def start(**overrides: Any) -> Gateway:
        return await start_gateway(upstream=ws_upstream.url, **overrides)

    return start


def ws_url(gateway: Gateway, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{gateway.proxy.server.port}{path}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_text_binary_and_a_large_message_echo_through_the_tunnel(
    start_ws: StartWs, ws_upstream: WsUpstream
) -> None:
    gateway = await start_ws()
    created = await gateway.create_token(access_level="read_only")
    async with aiohttp.ClientSession() as session, session.ws_connect(
        ws_url(gateway), headers=bearer(created["token"]), protocols=("chat",), max_msg_size=0
    ) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("héllo")
        assert (await ws.receive(timeout=10)).data == "héllo"
        await ws.send_bytes(b"\x00\x01\xff")
        message = await ws.receive(timeout=10)
        assert message.type == WSMsgType.BINARY and message.data == b"\x00\x01\xff"
        large = bytes(range(256)) * 4096  # 1 MiB
        await ws.send_bytes(large)
        assert (await ws.receive(timeout=10)).data == large
    seen = ws_upstream.seen[-1]
    assert seen["X-Gateway-Token-Id"] == created["id"]
    assert "Authorization" not in seen
    assert seen["Sec-WebSocket-Protocol"] == "chat"


async def test_the_websockets_client_echoes_and_closes_cleanly(start_ws: StartWs, ws_upstream: WsUpstream) -> None:
    gateway = await start_ws()
    token = (await gateway.create_token())["token"]
    async with websockets.connect(ws_url(gateway), additional_headers=bearer(token), max_size=None) as ws:
        await ws.send("ping")
        assert await asyncio.wait_for(ws.recv(), 10) == "ping"
        await ws.send(b"\x02" * 1_000_000)
        assert await asyncio.wait_for(ws.recv(), 10) == b"\x02" * 1_000_000
    await eventually(lambda: _is(ws_upstream.open == 0))


async def test_fifty_tunnels_at_once_each_get_their_own_answers(start_ws: StartWs) -> None:
    gateway = await start_ws()
    token = (await gateway.create_token())["token"]
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(ws_url(gateway), headers=bearer(token)) for _ in range(50)]
        await asyncio.gather(*(ws.send_str(f"n{n}") for n, ws in enumerate(sockets)))
        answers = await asyncio.gather(*(ws.receive(timeout=10) for ws in sockets))
        assert [message.data for message in answers] == [f"n{n}" for n in range(50)]
        for ws in sockets:
            await ws.close()


async def test_an_upstream_close_reaches_the_client_with_its_code(start_ws: StartWs) -> None:
    gateway = await start_ws()
    token = (await gateway.create_token())["token"]
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url(gateway), headers=bearer(token)) as ws:
            await ws.send_str("close-me")
            message = await ws.receive(timeout=10)
            assert message.type == WSMsgType.CLOSE and message.data == 4000


async def test_a_client_close_ends_the_upstream_side(start_ws: StartWs, ws_upstream: WsUpstream) -> None:
    gateway = await start_ws()
    token = (await gateway.create_token())["token"]
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(ws_url(gateway), headers=bearer(token))
        await eventually(lambda: _is(ws_upstream.open == 1))
        await ws.close()
        assert ws.close_code == 1000
    await eventually(lambda: _is(ws_upstream.open == 0))


async def test_refused_upgrades_get_the_usual_problem_answers(start_ws: StartWs) -> None:
    gateway = await start_ws()
    restricted = (await gateway.create_token(access_level="restricted_read_only"))["token"]
    async with aiohttp.ClientSession() as session:
        for headers, path, status, code in (
            ({}, "/ws", 401, "missing_token"),
            (bearer("gw_live_wrong"), "/ws", 401, "invalid_token"),
            (bearer(restricted), "/ws", 403, "insufficient_access_level"),
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(ws_url(gateway, path), headers=headers)
            assert refused.value.status == status, (path, headers)
        # The problem body itself, as a plain client reading the refused upgrade sees it.
        response = await session.get(
            ws_url(gateway).replace("ws://", "http://"),
            headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", **bearer(restricted)},
        )
        assert response.status == 403
        assert response.content_type == "application/problem+json"
        assert (await response.json())["code"] == "insufficient_access_level"
        async with session.ws_connect(ws_url(gateway, "/api/public/ws"), headers=bearer(restricted)) as ws:
            await ws.send_str("allowed")
            assert (await ws.receive(timeout=10)).data == "allowed"


async def test_a_non_101_answer_from_the_upstream_is_relayed(start_ws: StartWs) -> None:
    gateway = await start_ws()
    token = (await gateway.create_token())["token"]
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(ws_url(gateway, "/teapot"), headers=bearer(token))
        assert refused.value.status == 418


async def test_a_limited_tokens_upgrade_answers_carry_the_ratelimit_fields(start_ws: StartWs) -> None:
    gateway = await start_ws()
    token = (await gateway.create_token(quota={"requests": 3, "period": "total"}))["token"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy.server.port)
    try:
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            + f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b'\r\nRateLimit-Policy: "quota";q=3\r\nRateLimit: "quota";r=2\r\n' in head
    finally:
        writer.close()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(ws_url(gateway, "/teapot"), headers=bearer(token))
    assert refused.value.status == 418
    assert refused.value.headers is not None and refused.value.headers["RateLimit"] == '"quota";r=1'


async def test_tunnels_are_bounded_per_token_and_in_all(start_ws: StartWs) -> None:
    gateway = await start_ws(websocket_max_tunnels_per_token=2, websocket_max_tunnels=3)
    first, second = (await gateway.create_token())["token"], (await gateway.create_token())["token"]
    async with aiohttp.ClientSession() as session:
        held = [await session.ws_connect(ws_url(gateway), headers=bearer(first)) for _ in range(2)]
        refused = await _refusal(session, gateway, first)
        assert refused == (429, "too_many_tunnels")
        held.append(await session.ws_connect(ws_url(gateway), headers=bearer(second)))
        assert await _refusal(session, gateway, second) == (503, "tunnel_capacity")
        await held.pop().close()
        await eventually(lambda: _accepted(session, gateway, second))


async def _refusal(session: aiohttp.ClientSession, gateway: Gateway, token: str) -> tuple[int, str]:
    response = await session.get(
        ws_url(gateway).replace("ws://", "http://"),
        headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", **bearer(token)},
    )
    body = await response.read()
    return response.status, json.loads(body)["code"]


async def _accepted(session: aiohttp.ClientSession, gateway: Gateway, token: str) -> bool:
    try:
        ws = await session.ws_connect(ws_url(gateway), headers=bearer(token))
    except aiohttp.WSServerHandshakeError:
        return False
    await ws.close()
    return True


async def _is(value: bool) -> bool:
    return value


async def test_frames_sent_before_the_101_arrive_on_the_raw_socket(start_ws: StartWs) -> None:
    gateway = await start_ws()
    token = (await gateway.create_token())["token"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy.server.port)
    try:
        mask = b"\x01\x02\x03\x04"
        frame = b"\x81\x82" + mask + bytes(byte ^ mask[n % 4] for n, byte in enumerate(b"hi"))
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            + f"Authorization: Bearer {token}\r\n\r\n".encode()
            + frame
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"\x81\x02hi"
    finally:
        writer.close()
