"""Redis Cluster: an admin and two proxies given a `redis+cluster://` URL, on a real cluster of three primaries
and three replicas (redis-server --cluster-enabled, `redis-cli --cluster create`). The cache ttl is a minute
and the store is SQLite, which announces nothing, so only the cluster can carry a change to a proxy. Primaries
are killed, their replicas promoted, and changes, the shared cache and the shared limits keep working without
a restart."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis

from gateway.health import readiness
from gateway.redis_cluster import GatewayCluster
from gateway.settings import SettingsError, load_settings
from tests.conftest import REDIS_CLUSTER_PASSWORD, Gateway, GatewayFactory, Upstream, eventually
from tests.gateway.test_shared_cache import Cluster, start_cluster
from tests.gateway.test_shared_rate_limits import HEALTH, Replicas, _drive, until
from tests.redis_server import RedisClusterSet, free_port

CHANNEL = "gateway:token-changes"


def _listeners(gateways: Cluster) -> list:  # type: ignore[type-arg]
    return [replica.core.shared.listener for replica in gateways.replicas]  # type: ignore[union-attr]


async def _limited_statuses(gateways: Cluster, token: str, count: int) -> list[int]:
    """`count` requests, alternating between the proxies."""
    answers = []
    for n in range(count):
        response = await gateways.replicas[n % 2].call(token, "/api/posts")
        await response.read()
        answers.append(response.status)
    return answers


async def _ready(gateway: Gateway) -> dict[str, str]:
    status, body = await gateway.admin_call("GET", "/readyz")
    return dict(body) if isinstance(body, dict) else {"status": str(status)}


async def test_every_lifecycle_change_reaches_both_proxies_on_a_cluster(
    redis_cluster: RedisClusterSet, start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gateways = await start_cluster(start_gateway, redis_cluster.url(count=2), cache_ttl=60)
    created = await gateways.admin.create_token(access_level="editorial")
    token, token_id = created["token"], created["id"]
    assert await gateways.statuses(token) == [(200, None)] * 2

    await gateways.admin.admin_call("POST", f"/v1/tokens/{token_id}/disable")
    await gateways.until_all(token, (401, "token_disabled"))
    await gateways.admin.admin_call("POST", f"/v1/tokens/{token_id}/enable")
    await gateways.until_all(token, (200, None))
    _, rotated = await gateways.admin.admin_call("POST", f"/v1/tokens/{token_id}/rotate")
    await gateways.until_all(token, (401, "invalid_token"))
    await gateways.until_all(rotated["token"], (200, None))
    status, _ = await gateways.admin.admin_call("DELETE", f"/v1/tokens/{token_id}")
    assert status == 204
    await gateways.until_all(rotated["token"], (401, "invalid_token"))

    # Heard on the channel, each proxy subscribed on one node; the entries live on the slot's primary.
    assert all(listener.messages >= 4 for listener in _listeners(gateways))
    with redis_cluster.owner_of(f"gateway:token:{token_id}").client() as owner:
        assert str(owner.get(f"gateway:token:{token_id}")).endswith("|deleted")
    assert await gateways.admin.core.store.pending_changes() == []
    ready = await _ready(gateways.admin)
    assert ready["redis"] == "ok" and ready["status"] == "ok", ready
    logged = caplog.text + "".join(repr(record.args) for record in caplog.records)
    assert REDIS_CLUSTER_PASSWORD not in logged


async def test_rate_limits_and_quotas_are_shared_by_both_proxies_on_a_cluster(
    redis_cluster: RedisClusterSet, start_gateway: GatewayFactory
) -> None:
    gateways = await start_cluster(start_gateway, redis_cluster.url(), cache_ttl=60)
    rated = await gateways.admin.create_token(rate_limit={"requests": 7, "per_seconds": 3600})
    quoted = await gateways.admin.create_token(quota={"requests": 5, "period": "day"})

    assert sorted(await _limited_statuses(gateways, rated["token"], 16)) == [200] * 7 + [429] * 9
    assert sorted(await _limited_statuses(gateways, quoted["token"], 12)) == [200] * 5 + [429] * 7

    # Counted by the primary of the token's hash tag slot, through the pipes to it.
    for created in (rated, quoted):
        owner = redis_cluster.owner_of(f"{{{created['id']}}}")
        with owner.client() as client:
            assert client.keys(f"gateway:limit:{{{created['id']}}}:*")
    for replica in gateways.replicas:
        shared = replica.core.limiter.shared
        assert shared is not None and shared.redis_checks == 14 and shared.fallback_checks == 0
        assert replica.core.limiter.mode == "shared"

    # A deleted token's lasting counts go with it, from their own primary (not always the entry's); a day's
    # counter expires with its day.
    status, _ = await gateways.admin.admin_call("DELETE", f"/v1/tokens/{rated['id']}")
    assert status == 204
    owner = redis_cluster.owner_of(f"{{{rated['id']}}}")

    async def gone() -> bool:
        with owner.client() as client:
            return not client.exists(f"gateway:limit:{{{rated['id']}}}:rate")

    await eventually(gone)


async def test_many_tokens_checked_in_one_turn_are_batched_per_slot_on_a_cluster(
    redis_cluster: RedisClusterSet, start_gateway: GatewayFactory
) -> None:
    """A script's keys must share a hash slot: checks of many tokens arriving together are sent per slot,
    never as one batch Redis would refuse with CROSSSLOT (each such check would fall back to redis-py)."""
    gateways = await start_cluster(start_gateway, redis_cluster.url(), cache_ttl=60)
    proxy = gateways.replicas[0]

    async def status(token: str) -> int:
        response = await proxy.call(token, "/api/posts")
        await response.read()
        return int(response.status)

    tokens = [await gateways.admin.create_token(rate_limit={"requests": 3, "per_seconds": 3600}) for _ in range(12)]
    for created in tokens:  # known to the proxy first, so that the checks below come in one burst
        assert await status(created["token"]) == 200
    answers = await asyncio.gather(*(status(created["token"]) for created in tokens for _ in range(4)))
    assert sorted(answers) == [200] * 24 + [429] * 24  # 2 more each, then refused
    shared = proxy.core.limiter.shared  # type: ignore[union-attr]
    assert shared is not None and shared.redis_checks == 60 and shared.fallback_checks == 0
    assert shared._cluster_pipes is not None and shared._cluster_pipes.fallbacks == 0
    primaries = {redis_cluster.owner_of(f"{{{created['id']}}}").port for created in tokens}
    assert len(primaries) > 1  # the tokens' slots are spread over several primaries


@pytest.fixture
async def proxy_processes(
    redis_cluster: RedisClusterSet, start_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> AsyncIterator[Replicas]:
    """Two real `gateway proxy` processes on the cluster, beside an admin plane in the test process."""
    url = redis_cluster.url(count=3)
    admin = await start_gateway(planes=("admin",), redis_url=url)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    environment.update(
        GATEWAY_DATABASE_URL=f"sqlite:///{admin.database}",
        GATEWAY_REDIS_URL=url,
        GATEWAY_UPSTREAM=upstream.url,
        GATEWAY_PROXY_HEALTH_PATH=HEALTH,
        GATEWAY_CACHE_TTL="60",
        GATEWAY_ARGON2_TIME_COST="1",
        GATEWAY_ARGON2_MEMORY_COST_KIB="1024",
        GATEWAY_ACCESS_LOG="off",
    )
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"proxy-{n}.log" for n in range(2)]
    outputs = [log.open("wb") for log in logs]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "proxy", "--proxy-listen", f"127.0.0.1:{port}"],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        for port, output in zip(ports, outputs, strict=True)
    ]
    session = aiohttp.ClientSession()
    replicas = Replicas(admin, ports, session)
    try:
        for replica, process in enumerate(processes):

            async def up(replica: int = replica, process: subprocess.Popen[bytes] = process) -> bool:
                assert process.poll() is None, logs[replica].read_text()
                try:
                    return (await replicas.health(replica))[0] == 200
                except aiohttp.ClientError:
                    return False

            await until(up, attempts=1200)
        yield replicas
    finally:
        await session.close()
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
        for output in outputs:
            output.close()
        for log in logs:
            text = log.read_text()
            assert "Traceback" not in text and REDIS_CLUSTER_PASSWORD not in text, text


async def test_two_proxy_processes_share_limits_and_hear_every_change_on_a_cluster(
    proxy_processes: Replicas,
) -> None:
    replicas = proxy_processes
    quoted = await replicas.admin.create_token(quota={"requests": 9, "period": "day"})
    answers = await _drive(replicas, quoted["token"], 24)
    assert sum(status == 200 for status, _, _ in answers) == 9
    assert {(status, code) for status, code, _ in answers if status != 200} == {(429, "quota_exceeded")}
    remaining = sorted(
        int(headers["RateLimit"].split("r=")[1].split(";")[0]) for s, _, headers in answers if s == 200
    )
    assert remaining == list(range(9))  # one count in the cluster, shared by both processes
    assert (await replicas.health(0))[1]["rate_limits"] == "shared"

    created = await replicas.admin.create_token()
    token, token_id = created["token"], created["id"]

    async def both(expected: tuple[int, str]) -> bool:
        return [(await replicas.call(n, token))[:2] for n in range(2)] == [expected] * 2

    await until(lambda: both((200, "")))
    for action, expected in (("disable", (401, "token_disabled")), ("enable", (200, ""))):
        await replicas.admin.admin_call("POST", f"/v1/tokens/{token_id}/{action}")
        await until(lambda expected=expected: both(expected))  # type: ignore[misc]
    _, rotated = await replicas.admin.admin_call("POST", f"/v1/tokens/{token_id}/rotate")
    await until(lambda: both((401, "invalid_token")))
    token = rotated["token"]
    await until(lambda: both((200, "")))
    await replicas.admin.admin_call("DELETE", f"/v1/tokens/{token_id}")
    await until(lambda: both((401, "invalid_token")))


async def test_after_a_primary_fails_over_changes_cache_and_limits_recover_without_a_restart(
    redis_cluster: RedisClusterSet, start_gateway: GatewayFactory
) -> None:
    gateways = await start_cluster(start_gateway, redis_cluster.url(), cache_ttl=60)
    created = await gateways.admin.create_token(quota={"requests": 100_000, "period": "day"})
    token, token_id = created["token"], created["id"]
    assert await gateways.statuses(token) == [(200, None)] * 2
    await gateways.admin.admin_call("POST", f"/v1/tokens/{token_id}/disable")
    await gateways.until_all(token, (401, "token_disabled"))

    # The primary counting the token's limits, then (when another) the one holding its entry.
    limit_owner = redis_cluster.owner_of(f"{{{token_id}}}")
    entry_owner = redis_cluster.owner_of(f"gateway:token:{token_id}")
    await asyncio.to_thread(redis_cluster.kill_and_wait_for_promotion, limit_owner)
    if entry_owner is not limit_owner:
        await asyncio.to_thread(redis_cluster.kill_and_wait_for_promotion, entry_owner)
    await gateways.admin.admin_call("POST", f"/v1/tokens/{token_id}/enable")

    async def enabled_everywhere() -> bool:
        return await gateways.statuses(token) == [(200, None)] * 2

    await eventually(enabled_everywhere, attempts=600, pause=0.02)

    async def delivered() -> bool:  # announced at once; confirmed once the layout settled
        return await gateways.admin.core.store.pending_changes() == []

    await eventually(delivered, attempts=600, pause=0.02)
    with redis_cluster.owner_of(f"gateway:token:{token_id}").client() as promoted:
        assert promoted.get(f"gateway:token:{token_id}") is not None  # delivered to the promoted replica

    async def limits_shared_again() -> bool:
        await _limited_statuses(gateways, token, 2)
        return all(replica.core.limiter.mode == "shared" for replica in gateways.replicas)

    await eventually(limits_shared_again, attempts=300, pause=0.05)
    # Counted in the cluster again: the next requests are each one more in the one shared count.
    def shared_checks() -> list[int]:  # counted in Redis, or from a lease Redis granted; not per process
        return [
            replica.core.limiter.shared.redis_checks + replica.core.limiter.shared.leased_checks  # type: ignore[union-attr]
            for replica in gateways.replicas
        ]

    before = shared_checks()
    assert await _limited_statuses(gateways, token, 4) == [200] * 4
    after = shared_checks()
    assert [b - a for a, b in zip(before, after, strict=True)] == [2, 2]

    await gateways.admin.admin_call("POST", f"/v1/tokens/{token_id}/disable")
    await gateways.until_all(token, (401, "token_disabled"))

    async def all_ready() -> bool:
        checks = [await readiness(gateway.core) for gateway in (gateways.admin, *gateways.replicas)]
        return all(ready and found["redis"] == "ok" for ready, found in checks)

    await eventually(all_ready, attempts=300, pause=0.05)  # every primary answers again


async def test_when_the_node_a_proxy_listens_on_dies_it_subscribes_on_another_and_refreshes(
    redis_cluster: RedisClusterSet, start_gateway: GatewayFactory
) -> None:
    gateways = await start_cluster(start_gateway, redis_cluster.url(), cache_ttl=60)
    created = await gateways.admin.create_token()
    token, token_id = created["token"], created["id"]
    assert await gateways.statuses(token) == [(200, None)] * 2
    listeners = _listeners(gateways)
    await eventually(lambda: _true(all(listener.connected.is_set() for listener in listeners)))
    listened_on = await asyncio.to_thread(redis_cluster.subscribers, CHANNEL)
    assert listened_on and all(listener.node is not None for listener in listeners)
    assert {f"127.0.0.1:{node.port}" for node in listened_on} == {listener.node for listener in listeners}

    for node in listened_on:
        node.kill()
    await eventually(
        lambda: _true(all(listener.subscriptions >= 2 and listener.connected.is_set() for listener in listeners)),
        attempts=600,
        pause=0.02,
    )
    now_on = await asyncio.to_thread(redis_cluster.subscribers, CHANNEL)
    assert now_on and not {node.port for node in now_on} & {node.port for node in listened_on}
    # The reconnect marked every cached token stale: each proxy asks again on the token's next use.
    reads = [replica.core.tokens.misses for replica in gateways.replicas]
    assert await gateways.statuses(token) == [(200, None)] * 2
    assert all(replica.core.tokens.misses > before for replica, before in zip(gateways.replicas, reads, strict=True))

    await asyncio.to_thread(redis_cluster.wait_until_healthy)
    before = [listener.messages for listener in listeners]
    await gateways.admin.admin_call("POST", f"/v1/tokens/{token_id}/disable")
    await gateways.until_all(token, (401, "token_disabled"))
    assert all(listener.messages > count for listener, count in zip(listeners, before, strict=True))


async def test_a_change_no_replica_of_its_primary_confirmed_stays_in_the_outbox_until_one_does(
    redis_cluster: RedisClusterSet, start_gateway: GatewayFactory
) -> None:
    """As with Sentinel: else a failover could promote a replica holding the token as it was before."""
    gateways = await start_cluster(start_gateway, redis_cluster.url(), cache_ttl=60)
    created = await gateways.admin.create_token()
    token, token_id = created["token"], created["id"]
    assert await gateways.statuses(token) == [(200, None)] * 2
    replica = redis_cluster.replica_of(redis_cluster.owner_of(f"gateway:token:{token_id}"))
    assert replica.process is not None
    replica.process.send_signal(signal.SIGSTOP)
    try:
        status, _ = await gateways.admin.admin_call("POST", f"/v1/tokens/{token_id}/disable")
        assert status == 200
        await gateways.until_all(token, (401, "token_disabled"))  # the primary has it and announced it
        assert [token_id for _, token_id in await gateways.admin.core.store.pending_changes()] == [token_id]
    finally:
        replica.process.send_signal(signal.SIGCONT)

    async def delivered() -> bool:
        return await gateways.admin.core.store.pending_changes() == []

    await eventually(delivered, attempts=600, pause=0.02)
    assert await gateways.statuses(token) == [(401, "token_disabled")] * 2


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:x", "HOST:PORT"),
        ("redis+cluster://:hunter2-secret@127.0.0.1:7000/1", "database 0"),
        ("redis+cluster://:hunter2/secret@127.0.0.1:7000", "database 0"),  # an unescaped / in it
        ("redis+cluster://:hunter2-secret@127.0.0.1:7000/?db=1", "TLS options"),
        ("redis+cluster://:hunter2-secret@127.0.0.1:7000/?ssl_ca_certs=/ca.pem", "not rediss+cluster"),
        ("redis+cluster://:hunter2-secret@127.0.0.1:7000#hunter2", "fragment"),
        ("redis+cluster://:hunter2-secret@", "HOST:PORT"),
    ],
)
def test_a_bad_cluster_url_stops_start_up_with_one_line_and_no_password(url: str, message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={"GATEWAY_REDIS_URL": url})
    assert message in str(raised.value) and "hunter2" not in str(raised.value)


def test_a_cluster_url_keeps_its_password_out_of_the_settings_repr_and_the_address() -> None:
    from gateway.redis_tokens import connect, redis_address

    url = "rediss+cluster://gateway:hunter2-secret@10.0.0.1:6379,[::1]:6380/?ssl_ca_certs=/etc/redis/ca.pem"
    settings = load_settings(environ={"GATEWAY_REDIS_URL": url})
    assert settings.redis_url is not None and settings.redis_url.reveal() == url
    assert "hunter2" not in repr(settings)
    client = connect(url)
    assert isinstance(client, GatewayCluster)
    assert redis_address(client) == "cluster via 10.0.0.1:6379,::1:6380"
    assert client.connection_kwargs["ssl_ca_certs"] == "/etc/redis/ca.pem"
    assert client.connection_kwargs["password"] == "hunter2-secret"
    assert client.connection_kwargs["connection_class"] is redis.asyncio.SSLConnection
