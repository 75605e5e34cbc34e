"""A proxy's change listener on a real Redis: what a message does to the token it names and to the propagation
histogram, a subscription made only once Redis answers, and a Redis gone silent noticed by an unanswered ping
(the in-process listeners poll every 50 ms, so a quiet channel's pings are seen without waiting seconds)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as redis
from pytest_aiohttp import AiohttpClient

from gateway.invalidation import InvalidationListener
from gateway.metrics.listener import create_metrics_app
from gateway.redis_tokens import RedisKeys, RedisTokens, connect, disconnect
from gateway.store import SQLiteStore
from gateway.token_cache import TokenCache
from tests.conftest import Gateway, GatewayFactory, eventually
from tests.gateway.test_metrics import Samples, parse, value
from tests.redis_server import RedisServer

REDIS_HITS = {"layer": "redis", "result": "hit"}


async def _publish(proxy: Gateway, message: str) -> None:
    assert proxy.core.shared is not None
    listener = proxy.core.shared.listener
    heard = listener.messages
    await proxy.core.shared.client.publish(proxy.core.shared.tokens.keys.changes_channel, message)

    async def received() -> bool:
        return listener.messages == heard + 1

    await eventually(received)


async def test_a_change_message_refreshes_its_token_and_records_the_lag_from_its_commit_time(
    start_gateway: GatewayFactory, redis_url: str, aiohttp_client: AiohttpClient
) -> None:
    admin = await start_gateway(planes=("admin",), redis_url=redis_url, cache_ttl=60)
    proxy = await start_gateway(planes=("proxy",), redis_url=redis_url, cache_ttl=60)
    scraper = await aiohttp_client(create_metrics_app(proxy.core, None))

    async def samples() -> Samples:
        response = await scraper.get("/metrics")
        assert response.status == 200
        return parse(await response.text())

    created = await admin.create_token()

    async def creation_heard() -> bool:
        return value(await samples(), "gateway_change_propagation_seconds_count") == 1

    await eventually(creation_heard)
    assert (await proxy.call(created["token"])).status == 200
    assert (await proxy.call(created["token"])).status == 200  # from memory: one Redis read in all
    before = await samples()
    assert value(before, "gateway_token_lookups_total", **REDIS_HITS) == 1

    await _publish(proxy, f"{created['id']} {time.time() - 5:.6f}")  # committed 5 s ago
    assert (await proxy.call(created["token"])).status == 200
    lagged = await samples()
    assert value(lagged, "gateway_token_lookups_total", **REDIS_HITS) == 2  # the message made it read again
    assert value(lagged, "gateway_change_propagation_seconds_count") == 2
    lag = value(lagged, "gateway_change_propagation_seconds_sum") - value(before, "gateway_change_propagation_seconds_sum")
    assert 5 <= lag < 60

    # A commit clock ahead of this host's counts as no lag; a time that is no number, or none, as no sample.
    await _publish(proxy, f"{created['id']} {time.time() + 30:.6f}")
    ahead = await samples()
    assert value(ahead, "gateway_change_propagation_seconds_count") == 3
    assert value(ahead, "gateway_change_propagation_seconds_sum") == value(lagged, "gateway_change_propagation_seconds_sum")
    for message in (f"{created['id']} soon", created["id"]):
        await _publish(proxy, message)
    assert (await proxy.call(created["token"])).status == 200
    after = await samples()
    assert value(after, "gateway_change_propagation_seconds_count") == 3
    assert value(after, "gateway_token_lookups_total", **REDIS_HITS) == 3


async def test_a_proxy_started_while_redis_is_down_subscribes_once_it_answers(
    start_gateway: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    server = RedisServer(tmp_path / "redis")  # not started yet
    starting = asyncio.ensure_future(start_gateway(planes=("proxy",), redis_url=server.url, cache_ttl=60))
    try:
        async def refused() -> bool:
            return any(
                record.getMessage().endswith(
                    "); cached tokens are trusted for at most the cache ttl; reconnecting to its change channel"
                )
                for record in caplog.records
            )

        await eventually(refused)
        server.start()
        proxy = await asyncio.wait_for(starting, timeout=15)
        messages = [record.getMessage() for record in caplog.records if record.name == "gateway.invalidation"]
        assert "token change channel reconnected; cached tokens will be refreshed" in messages

        admin = await start_gateway(planes=("admin",), redis_url=server.url, cache_ttl=60)
        created = await admin.create_token()
        assert (await proxy.call(created["token"])).status == 200
        await admin.admin_call("POST", f"/v1/tokens/{created['id']}/disable")

        async def disabled() -> bool:
            response = await proxy.call(created["token"])
            return response.status == 401 and (await response.json())["code"] == "token_disabled"

        await eventually(disabled)
    finally:
        starting.cancel()
        server.kill()


async def test_a_redis_that_stops_answering_is_noticed_by_the_listener_and_every_entry_refreshed_after(
    start_gateway: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopped Redis keeps its connections open and silent: only an unanswered ping tells. Without noticing,
    the proxy would keep its subscription and never refresh what it missed meanwhile."""
    caplog.set_level(logging.DEBUG, logger="gateway")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        proxy = await start_gateway(planes=("proxy",), redis_url=server.url, cache_ttl=60)
        admin = await start_gateway(planes=("admin",), redis_url=server.url, cache_ttl=60)
        created = await admin.create_token()
        assert (await proxy.call(created["token"])).status == 200
        assert proxy.core.shared is not None and server.process is not None
        listener = proxy.core.shared.listener
        subscriptions = listener.subscriptions

        server.process.send_signal(signal.SIGSTOP)
        try:
            async def noticed() -> bool:
                return not listener.connected.is_set()

            await eventually(noticed, attempts=300, pause=0.05)
            # A change made meanwhile by an admin process that has no Redis: no message can carry it.
            unreachable = await start_gateway(planes=("admin",))
            status, _ = await unreachable.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
            assert status == 200
        finally:
            server.process.send_signal(signal.SIGCONT)

        async def resubscribed() -> bool:
            return listener.connected.is_set() and listener.subscriptions > subscriptions

        await eventually(resubscribed, attempts=300, pause=0.05)
        # Redis still holds the token as enabled: only the refresh after reconnecting explains this.
        response = await proxy.call(created["token"])
        assert (response.status, (await response.json())["code"]) == (401, "token_disabled")
        assert any(
            "TimeoutError: no answer to a ping within 1 s" in record.getMessage()
            for record in caplog.records
            if record.name == "gateway.redis_tokens"
        )
    finally:
        server.kill()


@dataclass
class Listening:
    listener: InvalidationListener
    client: redis.Redis
    channel: str


@pytest.fixture
async def listening(redis_url: str, tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[Listening]]]:
    """A proxy's listener in-process on the shared Redis, polling every 50 ms instead of every second."""
    store = SQLiteStore(tmp_path / "gateway.db")
    await store.open()
    client = connect(redis_url)
    tokens = RedisTokens(client, store)
    listener = InvalidationListener(client, tokens, TokenCache(tokens, {}), poll_interval=0.05)
    running: list[asyncio.Task[None]] = []

    async def start() -> Listening:
        running.append(asyncio.ensure_future(listener.run()))
        return Listening(listener, client, tokens.keys.changes_channel)

    yield start
    for task in running:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await disconnect(client)
    await store.close()


async def _pings(client: redis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_ping", {}).get("calls", 0))


async def test_a_quiet_channel_keeps_its_one_subscription_and_its_pings_are_answered(
    listening: Callable[[], Awaitable[Listening]],
) -> None:
    started = await listening()
    await asyncio.wait_for(started.listener.connected.wait(), timeout=10)
    pings = await _pings(started.client)

    async def pinged_thrice() -> bool:
        return await _pings(started.client) >= pings + 3

    await eventually(pinged_thrice)
    assert started.listener.connected.is_set()
    assert (started.listener.subscriptions, started.listener.messages) == (1, 0)


async def test_a_busy_channel_does_not_keep_the_listener_from_subscribing(
    listening: Callable[[], Awaitable[Listening]], redis_url: str
) -> None:
    """Only the subscribe confirmation is waited for: messages already flowing are heard, not drained."""
    publisher = connect(redis_url)
    channel = RedisKeys("gateway:").changes_channel  # the default prefix, as the listener's RedisTokens has

    async def publish_every_10_ms() -> None:
        while True:
            await publisher.publish(channel, "tokAAAAAAAAAAAAA")
            await asyncio.sleep(0.01)

    publishing = asyncio.ensure_future(publish_every_10_ms())
    try:
        started = await listening()
        await asyncio.wait_for(started.listener.connected.wait(), timeout=10)

        async def heard() -> bool:
            return started.listener.messages >= 3

        await eventually(heard)
        assert started.listener.subscriptions == 1
    finally:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        await disconnect(publisher)
