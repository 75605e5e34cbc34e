"""The limits script's own Redis connection (gateway/ratelimits/pipe.py), against a real redis-server: the
database named in the URL, a script cache emptied under it, and many requests in flight on one connection."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import redis.asyncio as redis

from gateway.ratelimits.pipe import PipeProtocol
from tests.conftest import GatewayFactory
from tests.redis_server import RedisServer


async def test_limits_live_in_the_database_the_url_names(
    start_gateway: GatewayFactory, redis_server: RedisServer, redis_url: str
) -> None:
    gateway = await start_gateway(redis_url=redis_url.rsplit("/", 1)[0] + "/5", redis_key_prefix="pipe:")
    created = await gateway.create_token(quota={"requests": 10, "period": "total"})

    assert (await gateway.call(created["token"])).status == 200

    async with redis.Redis(port=redis_server.port, db=5) as client:
        assert await client.get(f"pipe:limit:{{{created['id']}}}:quota:total") == b"1"
    async with redis.Redis(port=redis_server.port, db=0) as client:
        assert await client.keys("pipe:limit:*") == []


async def test_an_emptied_script_cache_is_refilled_without_a_failed_request(
    start_gateway: GatewayFactory, redis_server: RedisServer, redis_url: str
) -> None:
    gateway = await start_gateway(redis_url=redis_url)
    token = (await gateway.create_token(quota={"requests": 3, "period": "total"}))["token"]
    assert (await gateway.call(token)).status == 200

    async with redis.Redis(port=redis_server.port) as client:
        await client.script_flush()
    response = await gateway.call(token)

    assert response.status == 200 and response.headers["RateLimit"] == '"quota";r=1'
    assert gateway.core.limiter.mode == "shared"


async def test_concurrent_requests_on_one_connection_each_get_their_own_answer(
    start_gateway: GatewayFactory, redis_url: str
) -> None:
    gateway = await start_gateway(redis_url=redis_url)
    token = (await gateway.create_token(quota={"requests": 40, "period": "total"}))["token"]

    async def remaining() -> int:
        response = await gateway.call(token)
        assert response.status == 200
        return int(response.headers["RateLimit"].rsplit("r=", 1)[1])

    left = await asyncio.gather(*(remaining() for _ in range(40)))

    assert sorted(left) == list(range(40))
    assert (await gateway.call(token)).status == 429


async def test_replies_split_anywhere_across_reads_reach_their_callers_in_order() -> None:
    reply = b"*5\r\n:0\r\n:42\r\n$4\r\n17.5\r\n:3\r\n$1\r\n0\r\n"
    replies = reply + reply.replace(b":42", b":41") + b"-NOSCRIPT No matching script.\r\n"
    loop = asyncio.get_running_loop()
    for cut in range(1, len(replies)):
        protocol = PipeProtocol()
        callers = [loop.create_future() for _ in range(3)]
        protocol.waiting.extend(callers)
        protocol.data_received(replies[:cut])
        protocol.data_received(replies[cut:])
        assert [caller.result() for caller in callers[:2]] == [[0, 42, b"17.5", 3, b"0"], [0, 41, b"17.5", 3, b"0"]]
        assert str(callers[2].result()) == "NOSCRIPT No matching script."


async def test_a_redis_that_stops_answering_falls_back_within_the_timeout(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        gateway = await start_gateway(redis_url=server.url)
        token = (await gateway.create_token(quota={"requests": 5, "period": "total"}))["token"]
        assert (await gateway.call(token)).status == 200
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)  # connected, but silent: no reset, no refusal
        try:
            response = await asyncio.wait_for(gateway.call(token), timeout=30)
            assert response.status == 200 and response.headers["RateLimit"] == '"quota";r=4'  # counted locally
            assert gateway.core.limiter.mode == "per process (redis unavailable)"
        finally:
            server.process.send_signal(signal.SIGCONT)
    finally:
        server.kill()
