"""Redis run highly available under Sentinel: an admin and two proxy replicas given a `redis+sentinel://` URL,
real redis-server primary and replica, three real redis-sentinel processes. The primary is killed, a replica
promoted, and a change made afterwards still reaches both proxies through the new primary (the cache ttl is a
minute and the store is SQLite, which announces nothing, so only Redis can carry it)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.settings import SettingsError, load_settings
from tests.conftest import GatewayFactory, eventually
from tests.gateway.test_shared_cache import Cluster, start_cluster
from tests.redis_server import SentinelSet, free_port

PASSWORD = "sentinel-test-redis-password-42"


@pytest.fixture
async def sentinels(tmp_path: Path) -> AsyncIterator[SentinelSet]:
    watched = SentinelSet(tmp_path / "sentinel", password=PASSWORD)
    try:
        await asyncio.to_thread(watched.start)
        yield watched
    finally:
        watched.stop()


async def test_after_a_sentinel_failover_a_disable_still_reaches_every_proxy(
    start_gateway: GatewayFactory, sentinels: SentinelSet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # One listed sentinel is down from the start: the others answer for it.
    url = sentinels.url(extra_hosts=(f"127.0.0.1:{free_port()}",))
    cluster: Cluster = await start_cluster(start_gateway, url, cache_ttl=60)
    created = await cluster.admin.create_token()
    token, token_id = created["token"], created["id"]
    assert await cluster.statuses(token) == [(200, None)] * 2
    await cluster.admin.admin_call("POST", f"/v1/tokens/{token_id}/disable")
    await cluster.until_all(token, (401, "token_disabled"))

    await asyncio.to_thread(sentinels.kill_primary_and_wait_for_promotion)
    listeners = [replica.core.shared.listener for replica in cluster.replicas]  # type: ignore[union-attr]
    before = [listener.messages for listener in listeners]

    async def resubscribed() -> bool:
        return all(listener.subscriptions >= 2 and listener.connected.is_set() for listener in listeners)

    await eventually(resubscribed, attempts=600, pause=0.02)
    # Each replica now holds the disabled token again, fresh for a minute: only a message can change that.
    assert await cluster.statuses(token) == [(401, "token_disabled")] * 2
    status, _ = await cluster.admin.admin_call("POST", f"/v1/tokens/{token_id}/enable")
    assert status == 200

    async def enabled_everywhere() -> bool:
        return await cluster.statuses(token) == [(200, None)] * 2

    await eventually(enabled_everywhere, attempts=600, pause=0.02)
    # Heard on the change channel of the promoted primary, not found by a refresh after the reconnect.
    assert all(listener.messages > count for listener, count in zip(listeners, before, strict=True))
    assert await cluster.admin.core.store.pending_changes() == []

    await cluster.admin.admin_call("DELETE", f"/v1/tokens/{token_id}")
    await cluster.until_all(token, (401, "invalid_token"))
    logged = caplog.text + "".join(repr(record.args) for record in caplog.records)
    assert "service 'gateway-primary' via sentinel" in logged  # the outage was logged, by where it is
    assert PASSWORD not in logged


async def test_a_change_no_replica_confirmed_stays_in_the_outbox_until_one_does(
    start_gateway: GatewayFactory, sentinels: SentinelSet
) -> None:
    """Else a failover could promote a replica holding the token as it was before the change, for
    redis_entry_ttl, and proxies would read it there once they trust Redis again."""
    cluster: Cluster = await start_cluster(start_gateway, sentinels.url(), cache_ttl=60)
    created = await cluster.admin.create_token()
    token, token_id = created["token"], created["id"]
    assert await cluster.statuses(token) == [(200, None)] * 2
    assert sentinels.replica.process is not None
    sentinels.replica.process.send_signal(signal.SIGSTOP)
    try:
        status, _ = await cluster.admin.admin_call("POST", f"/v1/tokens/{token_id}/disable")
        assert status == 200
        await cluster.until_all(token, (401, "token_disabled"))  # the primary has it and announced it
        assert [token_id for _, token_id in await cluster.admin.core.store.pending_changes()] == [token_id]
    finally:
        sentinels.replica.process.send_signal(signal.SIGCONT)

    async def delivered() -> bool:
        return await cluster.admin.core.store.pending_changes() == []

    await eventually(delivered, attempts=600, pause=0.02)
    assert await cluster.statuses(token) == [(401, "token_disabled")] * 2


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://127.0.0.1:26379", "must name the service"),
        ("redis+sentinel://127.0.0.1:26379,127.0.0.1:x/main", "HOST:PORT"),
        ("redis+sentinel://:hunter2-secret@127.0.0.1:26379/main/zero", "database number"),
        ("redis+sentinel://:hunter2-secret@127.0.0.1:26379/main?db=1", "query"),
        ("redis+sentinel://:hunter2/secret@127.0.0.1:26379/main", "HOST:PORT"),  # an unescaped / in it
        ("redis+sentinel://:x@127.0.0.1:26379/a/hunter2", "database number"),
    ],
)
def test_a_bad_sentinel_url_stops_start_up_with_one_line_and_no_password(url: str, message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={"GATEWAY_REDIS_URL": url})
    assert message in str(raised.value) and "hunter2" not in str(raised.value)


def test_a_sentinel_url_keeps_its_password_out_of_the_settings_repr() -> None:
    url = "redis+sentinel://:hunter2-secret@10.0.0.1:26379,10.0.0.2:26379/main/2"
    settings = load_settings(environ={"GATEWAY_REDIS_URL": url})
    assert settings.redis_url is not None and settings.redis_url.reveal() == url
    assert "hunter2" not in repr(settings)
