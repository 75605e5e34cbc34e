"""Many processes, one store, one Redis: two proxy replicas and an admin process agree on every token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from gateway.redis_tokens import RedisTokens
from gateway.token_cache import TokenCache
from gateway.token_format import issue_token, parse_token
from tests.conftest import ADMIN_KEY, GatedStore, Gateway, GatewayFactory, eventually
from tests.redis_server import RedisServer


@dataclass
class Cluster:
    admin: Gateway
    replicas: list[Gateway]

    async def statuses(self, token: str, path: str = "/api/posts") -> list[tuple[int, str | None]]:
        answers = []
        for replica in self.replicas:
            response = await replica.call(token, path)
            body = await response.read()
            code = json.loads(body).get("code") if response.content_type == "application/problem+json" else None
            answers.append((response.status, code))
        return answers

    async def until_all(self, token: str, expected: tuple[int, str | None], path: str = "/api/posts") -> None:
        async def all_agree() -> bool:
            return await self.statuses(token, path) == [expected] * len(self.replicas)

        await eventually(all_agree)


async def start_cluster(start_gateway: GatewayFactory, redis_url: str, **overrides: Any) -> Cluster:
    admin = await start_gateway(planes=("admin",), redis_url=redis_url, **overrides)
    replicas = [await start_gateway(planes=("proxy",), redis_url=redis_url, **overrides) for _ in range(2)]
    return Cluster(admin, replicas)


@pytest.fixture
async def cluster(start_gateway: GatewayFactory, redis_url: str) -> Cluster:
    # A one-minute cache ttl: within a test, only a published change can make a replica notice it.
    return await start_cluster(start_gateway, redis_url, cache_ttl=60)


async def test_every_lifecycle_change_is_seen_by_both_replicas(cluster: Cluster) -> None:
    created = await cluster.admin.create_token(access_level="editorial")
    token, token_id = created["token"], created["id"]
    assert await cluster.statuses(token) == [(200, None), (200, None)]

    await cluster.admin.admin_call("POST", f"/v1/tokens/{token_id}/disable")
    await cluster.until_all(token, (401, "token_disabled"))
    await cluster.admin.admin_call("POST", f"/v1/tokens/{token_id}/enable")
    await cluster.until_all(token, (200, None))

    _, rotated = await cluster.admin.admin_call("POST", f"/v1/tokens/{token_id}/rotate")
    await cluster.until_all(token, (401, "invalid_token"))
    await cluster.until_all(rotated["token"], (200, None))
    token = rotated["token"]

    await cluster.admin.admin_call("PATCH", f"/v1/tokens/{token_id}", json={"allowed_ip_ranges": ["10.0.0.0/8"]})
    await cluster.until_all(token, (403, "ip_not_allowed"))
    await cluster.admin.admin_call("PATCH", f"/v1/tokens/{token_id}", json={"allowed_ip_ranges": []})
    await cluster.until_all(token, (200, None))

    await cluster.admin.admin_call("PATCH", f"/v1/tokens/{token_id}", json={"access_level": "restricted_read_only"})
    await cluster.until_all(token, (403, "insufficient_access_level"))

    status, _ = await cluster.admin.admin_call("DELETE", f"/v1/tokens/{token_id}")
    assert status == 204
    await cluster.until_all(token, (401, "invalid_token"))


async def test_a_change_reaches_replicas_by_message_not_by_expiry(start_gateway: GatewayFactory, redis_url: str) -> None:
    # With a one-minute cache ttl, only the published invalidation can make the replicas notice.
    cluster = await start_cluster(start_gateway, redis_url, cache_ttl=60)
    created = await cluster.admin.create_token()
    assert await cluster.statuses(created["token"]) == [(200, None)] * 2
    await cluster.admin.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    await cluster.until_all(created["token"], (401, "token_disabled"))
    assert all(replica.core.shared.listener.messages >= 1 for replica in cluster.replicas)  # type: ignore[union-attr]


async def test_steady_state_on_a_replica_reads_neither_redis_nor_the_store(cluster: Cluster) -> None:
    token = (await cluster.admin.create_token())["token"]
    replica = cluster.replicas[0]
    assert (await replica.call(token)).status == 200
    shared = replica.core.shared
    assert shared is not None
    before = (shared.tokens.redis_reads, replica.core.store.reads, replica.core.hasher.verify_calls)
    for _ in range(20):
        assert (await replica.call(token)).status == 200
    assert (shared.tokens.redis_reads, replica.core.store.reads, replica.core.hasher.verify_calls) == before


async def test_a_token_filled_by_one_replica_is_read_from_redis_by_the_other(cluster: Cluster) -> None:
    token = (await cluster.admin.create_token())["token"]
    first, second = cluster.replicas
    assert (await first.call(token)).status == 200
    reads = second.core.store.reads
    assert (await second.call(token)).status == 200
    assert second.core.store.reads == reads  # the admin's write-through (or the first fill) was in Redis


async def test_a_fill_that_read_the_store_before_a_revoke_cannot_overwrite_it(
    cluster: Cluster, redis_url: str
) -> None:
    created = await cluster.admin.create_token()
    token_id = created["id"]
    client = redis.Redis.from_url(redis_url)
    gated = GatedStore(cluster.admin.database)
    await gated.open()
    try:
        replica_tokens = RedisTokens(client, gated)
        replica_cache = TokenCache(replica_tokens, cluster.admin.core.settings.access_levels, ttl=5.0)
        await client.delete(replica_tokens.keys.token(token_id))  # as if Redis had evicted the entry
        filling = asyncio.ensure_future(replica_cache.get(token_id))
        await gated.read_done.wait()  # the replica read the enabled token from the store ...
        status, _ = await cluster.admin.admin_call("POST", f"/v1/tokens/{token_id}/disable")
        assert status == 200  # ... the admin committed the revoke and wrote it to Redis ...
        replica_cache.invalidate(token_id)  # ... and published it; then the stale read returns.
        gated.gate.set()
        await filling
        raw = await client.get(replica_tokens.keys.token(token_id))
        assert raw is not None
        version, _, payload = raw.partition(b"|")
        assert json.loads(payload)["status"] == "disabled"
        entry = await replica_cache.get(token_id)
        assert entry is not None and not entry.enabled
        await cluster.until_all(created["token"], (401, "token_disabled"))
    finally:
        await gated.close()
        await client.aclose()


async def test_unknown_token_ids_are_remembered_so_a_flood_spares_the_store(cluster: Cluster) -> None:
    replica = cluster.replicas[0]
    reads = replica.core.store.reads
    unknown = [str(issue_token("gw", f"Unknown{i:09d}")) for i in range(5)]
    for _ in range(10):
        for token in unknown:
            assert (await replica.call(token)).status == 401
    assert replica.core.store.reads - reads == len(unknown)


async def test_usage_from_both_replicas_reaches_the_admin_api_in_batches(cluster: Cluster) -> None:
    created = await cluster.admin.create_token()
    for replica in cluster.replicas:
        for _ in range(5):
            assert (await replica.call(created["token"])).status == 200

    async def visible() -> bool:
        _, view = await cluster.admin.admin_call("GET", f"/v1/tokens/{created['id']}")
        return view["last_used_at"] is not None and view["last_used_ip"] == "127.0.0.1"

    await eventually(visible)
    flushes = sum(replica.core.usage.flushes for replica in cluster.replicas)
    assert flushes < 10  # batched: fewer writes than the 10 requests


async def test_no_secret_reaches_redis(cluster: Cluster, redis_url: str) -> None:
    created = await cluster.admin.create_token()
    _, rotated = await cluster.admin.admin_call("POST", f"/v1/tokens/{created['id']}/rotate", json={"grace_seconds": 30})
    for token in (created["token"], rotated["token"]):
        assert (await cluster.replicas[0].call(token)).status == 200
    await cluster.admin.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    forbidden = [ADMIN_KEY.encode()]
    for token in (created["token"], rotated["token"]):
        parsed = parse_token(token, "gw")
        assert parsed is not None
        forbidden += [token.encode(), parsed.secret.encode(), parsed.secret[:20].encode()]
    client = redis.Redis.from_url(redis_url)
    try:
        dump = b""
        async for key in client.scan_iter():
            kind = await client.type(key)
            if kind == b"string":
                dump += key + (await client.get(key) or b"")
            elif kind == b"hash":
                dump += key + b"".join(k + v for k, v in (await client.hgetall(key)).items())
            else:
                dump += key
    finally:
        await client.aclose()
    assert b"$argon2id$" in dump  # the hashes are there, as designed
    for secret in forbidden:
        assert secret not in dump


async def test_readyz_reports_store_and_redis(cluster: Cluster) -> None:
    status, body = await cluster.admin.admin_call("GET", "/readyz")
    assert status == 200
    assert body["store"] == "ok" and body["redis"] == "ok" and body["undelivered_changes"] == "0"


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


async def test_redis_down_known_tokens_work_revokes_hold_and_everything_recovers(
    start_gateway: GatewayFactory, own_redis: RedisServer
) -> None:
    cluster = await start_cluster(start_gateway, own_redis.url, cache_ttl=0.3)
    known = await cluster.admin.create_token(name="known")
    never_seen = await cluster.admin.create_token(name="never seen by the replicas")
    revoked = await cluster.admin.create_token(name="revoked while redis is down")
    for token in (known["token"], revoked["token"]):
        assert await cluster.statuses(token) == [(200, None)] * 2

    own_redis.kill()
    # Valid tokens keep working, past the cache ttl too: the store answers when Redis does not.
    for _ in range(3):
        assert await cluster.statuses(known["token"]) == [(200, None)] * 2
        await asyncio.sleep(0.35)
    assert await cluster.statuses(never_seen["token"]) == [(200, None)] * 2
    # A revoke made now is committed, and no replica accepts the token once the ttl has passed.
    status, _ = await cluster.admin.admin_call("POST", f"/v1/tokens/{revoked['id']}/disable")
    assert status == 200
    await cluster.until_all(revoked["token"], (401, "token_disabled"))
    status, ready = await cluster.admin.admin_call("GET", "/readyz")
    assert status == 503 and ready["redis"] == "unavailable"

    own_redis.start()  # same port, empty: the processes reconnect by themselves
    for replica in cluster.replicas:
        await asyncio.wait_for(replica.core.shared.listener.connected.wait(), timeout=15)  # type: ignore[union-attr]

    async def delivered() -> bool:
        status, ready = await cluster.admin.admin_call("GET", "/readyz")
        return status == 200 and ready["undelivered_changes"] == "0"

    await eventually(delivered, attempts=300, pause=0.05)
    assert await cluster.statuses(revoked["token"]) == [(401, "token_disabled")] * 2
    # And pub/sub carries changes again.
    await cluster.admin.admin_call("POST", f"/v1/tokens/{known['id']}/disable")
    await cluster.until_all(known["token"], (401, "token_disabled"))


async def test_a_cut_change_channel_is_noticed_and_every_entry_refreshed_on_reconnect(
    start_gateway: GatewayFactory, redis_url: str
) -> None:
    cluster = await start_cluster(start_gateway, redis_url, cache_ttl=60)
    created = await cluster.admin.create_token()
    assert await cluster.statuses(created["token"]) == [(200, None)] * 2
    # A change whose message is lost: committed by an admin process that cannot reach Redis at all.
    unreachable = await start_gateway(planes=("admin",))
    status, _ = await unreachable.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    assert status == 200
    assert await cluster.statuses(created["token"]) == [(200, None)] * 2  # nothing told the replicas
    listeners = [replica.core.shared.listener for replica in cluster.replicas]  # type: ignore[union-attr]
    before = [listener.subscriptions for listener in listeners]

    client = redis.Redis.from_url(redis_url)
    try:
        killed = await client.client_kill_filter(_type="pubsub")
    finally:
        await client.aclose()
    assert killed == 2

    async def resubscribed() -> bool:
        return all(listener.subscriptions > count for listener, count in zip(listeners, before, strict=True))

    await eventually(resubscribed, attempts=300, pause=0.05)
    # Redis still holds the old version, so only the reconnect's full refresh from the store explains this.
    assert await cluster.statuses(created["token"]) == [(401, "token_disabled")] * 2
    # And once back, messages flow again.
    await cluster.admin.admin_call("POST", f"/v1/tokens/{created['id']}/enable")
    await cluster.until_all(created["token"], (200, None))
