"""An outage of Redis or of the upstream is logged once when it starts and once when it ends, with the address
and the reason: not a line, nor a traceback, per request or per retry."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.conftest import GatewayFactory
from tests.redis_server import RedisServer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _lines(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if name in record.getMessage()]


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


async def test_a_redis_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    start_gateway: GatewayFactory, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    gateway = await start_gateway(redis_url=own_redis.url, cache_ttl=0.1)
    created = await gateway.create_token(access_level="read_only")
    assert (await gateway.call(created["token"])).status == 200
    name = f"redis at 127.0.0.1:{own_redis.port}"

    own_redis.kill()
    for _ in range(20):
        assert (await gateway.call(created["token"])).status == 200  # the store answers
        await asyncio.sleep(0.06)  # past the cache ttl: every few requests try Redis again
    status, _ = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    assert status == 200  # committed; delivery waits in the outbox

    down = _lines(caplog, name)
    assert len(down) == 1, [record.getMessage() for record in down]
    assert down[0].levelno == logging.WARNING and "is failing (" in down[0].getMessage()
    assert "Error" in down[0].getMessage()  # the reason, e.g. ConnectionError: Error 111 connecting ...
    assert not any(record.exc_info for record in caplog.records)

    own_redis.start()  # same port: the process reconnects by itself

    for _ in range(300):
        if any("answers again" in record.getMessage() for record in _lines(caplog, name)):
            break
        await asyncio.sleep(0.05)
    lines = [record.getMessage() for record in _lines(caplog, name)]
    assert len(lines) == 2 and "answers again" in lines[1], lines


async def test_a_dead_upstream_is_logged_once_naming_it_and_the_error_then_once_when_back(
    start_gateway: GatewayFactory, aiohttp_server: AiohttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = _free_port()
    upstream = f"http://127.0.0.1:{port}"
    gateway = await start_gateway(upstream=upstream)
    created = await gateway.create_token(access_level="read_only")

    for _ in range(10):
        response = await gateway.call(created["token"])
        assert response.status == 502 and (await response.json())["code"] == "upstream_unavailable"

    down = _lines(caplog, f"upstream {upstream}")
    assert len(down) == 1 and down[0].levelno == logging.WARNING, [r.getMessage() for r in down]
    assert "is failing (Upstream" in down[0].getMessage() and "[Errno 111]" in down[0].getMessage()
    assert not any(record.exc_info for record in caplog.records)

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"back": True})

    app = web.Application()
    app.router.add_get("/{path:.*}", hello)
    await aiohttp_server(app, port=port)
    for _ in range(3):
        assert (await gateway.call(created["token"])).status == 200

    lines = [record.getMessage() for record in _lines(caplog, f"upstream {upstream}")]
    assert len(lines) == 2 and "answers again (10 failure(s)" in lines[1], lines
