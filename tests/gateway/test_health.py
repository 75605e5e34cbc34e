"""The proxy port's health answer for load balancers: no credentials, exact normalised match, never forwarded."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.settings import SettingsError, load_settings
from tests.conftest import Gateway, GatewayFactory, Upstream, eventually, send_raw
from tests.redis_server import RedisServer


async def test_health_path_answers_200_without_credentials_and_never_reaches_the_upstream(
    gateway: Gateway, upstream: Upstream
) -> None:
    response = await gateway.call(None, "/.gateway/health")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert await response.json() == {"status": "ok", "store": "ok", "redis": "not configured"}
    head = await gateway.call(None, "/.gateway/health", method="HEAD")
    assert head.status == 200 and await head.read() == b""
    assert upstream.requests == []


@pytest.mark.parametrize(
    "target",
    [
        b"/.gateway/health?probe=1",
        b"/.gateway/%68ealth",
        b"/api/../.gateway/health",
        b"//.gateway//health",
        b"/%2egateway/health",
    ],
)
async def test_every_spelling_of_the_health_path_is_answered_by_the_gateway(
    gateway: Gateway, upstream: Upstream, target: bytes
) -> None:
    status, reply = await send_raw(
        gateway.proxy, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200, reply
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["status"] == "ok"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "path", ["/.gateway/health/", "/.gateway/healthz", "/.gateway", "/api/.gateway/health"]
)
async def test_paths_near_the_health_path_are_judged_like_any_other(gateway: Gateway, path: str) -> None:
    response = await gateway.call(None, path)
    assert response.status == 401
    assert (await response.json())["code"] == "missing_credentials"


async def test_health_path_refuses_other_methods_without_forwarding(
    gateway: Gateway, upstream: Upstream
) -> None:
    token = (await gateway.create_token())["token"]
    response = await gateway.call(token, "/.gateway/health", method="POST", data=b"x")
    assert response.status == 405
    assert response.headers["Allow"] == "GET, HEAD"
    assert (await response.json())["code"] == "method_not_allowed"
    assert upstream.requests == []


async def test_a_configured_health_path_replaces_the_default(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(proxy_health_path="/lb-check")
    assert (await gateway.call(None, "/lb-check")).status == 200
    assert (await gateway.call(None, "/.gateway/health")).status == 401


async def test_an_empty_health_path_forwards_every_path(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await start_gateway(proxy_health_path="")
    token = (await gateway.create_token())["token"]
    assert (await gateway.call(None, "/.gateway/health")).status == 401
    response = await gateway.call(token, "/.gateway/health")
    assert response.status == 200 and upstream.last["raw_path"] == "/.gateway/health"


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


async def test_health_path_answers_503_while_redis_is_down_and_200_once_it_is_back(
    start_gateway: GatewayFactory, own_redis: RedisServer
) -> None:
    gateway = await start_gateway(redis_url=own_redis.url)
    response = await gateway.call(None, "/.gateway/health")
    assert response.status == 200 and (await response.json())["redis"] == "ok"
    own_redis.kill()

    async def reports(status: int, redis: str) -> bool:
        response = await gateway.call(None, "/.gateway/health")
        return response.status == status and (await response.json())["redis"] == redis

    await eventually(lambda: reports(503, "unavailable"))
    body = await (await gateway.call(None, "/.gateway/health")).json()
    assert body == {
        "status": "unavailable",
        "store": "ok",
        "redis": "unavailable",
        "rate_limits": "per process (redis unavailable)",
    }
    own_redis.start()
    await eventually(lambda: reports(200, "ok"), attempts=1500)


@pytest.mark.parametrize("value", ["health", "/", "/a/../b", "/a?b", "/caf\u00e9", "/a%2fb"])
def test_a_health_path_that_could_not_match_stops_start_up(value: str) -> None:
    with pytest.raises(SettingsError, match="GATEWAY_PROXY_HEALTH_PATH"):
        load_settings(environ={"GATEWAY_PROXY_HEALTH_PATH": value})
