"""Two proxy replicas and an admin process on PostgreSQL and Redis, where no process has a store file: every
change reaches both replicas, and with Redis killed the store's own notifications still carry a disable,
a rotation and a delete to both at once (the cache ttl is a minute, so nothing else could)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import GatewayFactory, eventually
from tests.gateway.test_shared_cache import Cluster, start_cluster
from tests.redis_server import RedisServer, free_port

pytestmark = pytest.mark.parametrize("store_backend", ["postgresql"], indirect=True)


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def cluster(start_gateway: GatewayFactory, own_redis: RedisServer) -> Cluster:
    cluster = await start_cluster(start_gateway, own_redis.url, cache_ttl=60)
    assert all(gateway.database is None for gateway in (cluster.admin, *cluster.replicas))
    return cluster


async def test_with_redis_down_a_disable_rotate_and_delete_hold_on_every_replica(
    cluster: Cluster, own_redis: RedisServer
) -> None:
    created = await cluster.admin.create_token()
    token, token_id = created["token"], created["id"]
    assert await cluster.statuses(token) == [(200, None)] * 2

    own_redis.kill()
    await cluster.admin.admin_call("POST", f"/v1/tokens/{token_id}/disable")
    await cluster.until_all(token, (401, "token_disabled"))
    await cluster.admin.admin_call("POST", f"/v1/tokens/{token_id}/enable")
    await cluster.until_all(token, (200, None))
    status, rotated = await cluster.admin.admin_call("POST", f"/v1/tokens/{token_id}/rotate")
    assert status == 200
    await cluster.until_all(token, (401, "invalid_token"))
    await cluster.until_all(rotated["token"], (200, None))
    await cluster.admin.admin_call("DELETE", f"/v1/tokens/{token_id}")
    await cluster.until_all(rotated["token"], (401, "invalid_token"))
    assert all(replica.core.store_listener.notifications >= 4 for replica in cluster.replicas)  # type: ignore[union-attr]


async def test_a_lost_notification_connection_is_regained_and_every_entry_refreshed(
    cluster: Cluster, own_redis: RedisServer, database_url: str
) -> None:
    created = await cluster.admin.create_token()
    assert await cluster.statuses(created["token"]) == [(200, None)] * 2
    own_redis.kill()
    connection = await asyncpg.connect(database_url)
    try:
        # Cut every listening connection, then change the token while no replica listens.
        await connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'api-token-gateway-listener'"
        )
        await connection.execute("UPDATE tokens SET status = 'disabled', version = version + 1")
    finally:
        await connection.close()
    await cluster.until_all(created["token"], (401, "token_disabled"))
    assert all(replica.core.store_listener.connections >= 2 for replica in cluster.replicas)  # type: ignore[union-attr]


async def test_every_lifecycle_change_reaches_both_replicas_on_postgres(cluster: Cluster) -> None:
    created = await cluster.admin.create_token(access_level="editorial")
    token, token_id = created["token"], created["id"]
    assert await cluster.statuses(token) == [(200, None)] * 2
    await cluster.admin.admin_call("PATCH", f"/v1/tokens/{token_id}", json={"allowed_ip_ranges": ["10.0.0.0/8"]})
    await cluster.until_all(token, (403, "ip_not_allowed"))
    await cluster.admin.admin_call("PATCH", f"/v1/tokens/{token_id}", json={"access_level": "restricted_read_only", "allowed_ip_ranges": []})
    await cluster.until_all(token, (403, "insufficient_access_level"))


async def test_a_change_whose_admin_never_reached_redis_is_delivered_by_a_proxy(
    cluster: Cluster, start_gateway: GatewayFactory, own_redis: RedisServer
) -> None:
    """Without it, Redis would keep the token's stale 'enabled' entry for redis_entry_ttl, and a proxy with a
    cold cache would believe it."""
    created = await cluster.admin.create_token()
    assert await cluster.statuses(created["token"]) == [(200, None)] * 2  # Redis holds it, enabled
    def deliveries() -> int:
        return sum(replica.core.shared.changes.delivered for replica in cluster.replicas)  # type: ignore[union-attr]

    before = deliveries()
    cut_off = await start_gateway(planes=("admin",), redis_url=f"redis://127.0.0.1:{free_port()}/0")
    status, _ = await cut_off.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    assert status == 200
    await cut_off.close()
    await cluster.admin.close()  # no admin process is left to deliver the outbox

    async def delivered() -> bool:
        return await cluster.replicas[0].core.store.pending_changes() == []

    await eventually(delivered)
    cold = await start_gateway(planes=("proxy",), redis_url=own_redis.url, cache_ttl=60)
    response = await cold.call(created["token"])
    assert response.status == 401 and (await response.json())["code"] == "token_disabled"
    assert deliveries() > before  # by a replica: no admin process was up


async def test_without_redis_two_replicas_hear_every_change_from_the_store_alone(start_gateway: GatewayFactory) -> None:
    """No Redis was ever configured: each process has only its own cache, which nothing refreshes but the
    store's NOTIFY."""
    cluster = await start_cluster(start_gateway, None)
    assert all(gateway.core.shared is None for gateway in (cluster.admin, *cluster.replicas))
    created = await cluster.admin.create_token()
    token, token_id = created["token"], created["id"]
    assert await cluster.statuses(token) == [(200, None)] * 2

    await cluster.admin.admin_call("POST", f"/v1/tokens/{token_id}/disable")
    await cluster.until_all(token, (401, "token_disabled"))
    await cluster.admin.admin_call("POST", f"/v1/tokens/{token_id}/enable")
    await cluster.until_all(token, (200, None))
    _, rotated = await cluster.admin.admin_call("POST", f"/v1/tokens/{token_id}/rotate")
    await cluster.until_all(token, (401, "invalid_token"))
    await cluster.until_all(rotated["token"], (200, None))
    await cluster.admin.admin_call("DELETE", f"/v1/tokens/{token_id}")
    await cluster.until_all(rotated["token"], (401, "invalid_token"))
    assert all(replica.core.store_listener.notifications >= 4 for replica in cluster.replicas)  # type: ignore[union-attr]
