"""A secret that fails against a cached entry is checked against the store before it counts as wrong.

The soak that found this: two proxies, Redis killed while tokens were rotated. A proxy still holding a token's
pre-rotation entry counted the new, correct secret as wrong; after `failure_limit_per_source` such answers every
client behind the same address got 429. Here the same outage and rotation run against real processes' planes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from datetime import UTC, datetime

import pytest

from gateway.authenticator import Authenticator
from gateway.failure_limits import FailureLimits
from gateway.secrets import Argon2Parameters, SecretHasher
from gateway.token_cache import TokenCache
from gateway.token_format import issue_token, new_token_id
from gateway.tokens import AuditEvent, TokenRecord, TokenStatus
from tests.conftest import GatedStore, GatewayFactory, eventually
from tests.gateway.test_shared_cache import start_cluster
from tests.redis_server import RedisServer


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


async def test_tokens_rotated_while_redis_is_down_are_accepted_by_replicas_holding_the_old_entry(
    start_gateway: GatewayFactory, own_redis: RedisServer
) -> None:
    # A one-minute cache ttl keeps the pre-rotation entries trusted for the whole test: only the store knows.
    cluster = await start_cluster(
        start_gateway, own_redis.url, cache_ttl=60, failure_limit_per_source=3, failure_limit_per_token=3
    )
    tokens = [await cluster.admin.create_token(name=f"integration {n}") for n in range(5)]
    for created in tokens:
        assert await cluster.statuses(created["token"]) == [(200, None)] * 2

    own_redis.kill()
    rotated = []
    for created in tokens:
        status, body = await cluster.admin.admin_call("POST", f"/v1/tokens/{created['id']}/rotate")
        assert status == 200, body
        rotated.append(body["token"])
    # More rotated tokens than the per-address limit, all from one address: none is refused, on either replica.
    for _ in range(2):
        for token in rotated:
            assert await cluster.statuses(token) == [(200, None)] * 2
    for created in tokens:
        assert await cluster.statuses(created["token"]) == [(401, "invalid_token")] * 2
    fresh = await cluster.admin.create_token(name="created during the outage")
    assert await cluster.statuses(fresh["token"]) == [(200, None)] * 2

    own_redis.start()
    for replica in cluster.replicas:
        await asyncio.wait_for(replica.core.shared.listener.connected.wait(), timeout=15)  # type: ignore[union-attr]

    async def delivered() -> bool:
        status, ready = await cluster.admin.admin_call("GET", "/readyz")
        return status == 200 and ready["undelivered_changes"] == "0"

    await eventually(delivered, attempts=300, pause=0.05)
    for token in [*rotated, fresh["token"]]:
        assert await cluster.statuses(token) == [(200, None)] * 2


async def test_wrong_secrets_still_count_after_the_store_agrees_with_the_cache(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(failure_limit_per_source=4, failure_limit_per_token=1000)
    created = await gateway.create_token()
    assert (await gateway.call(created["token"])).status == 200
    statuses = [(await gateway.call(str(issue_token("gw", created["id"])))).status for _ in range(8)]

    assert statuses == [401] * 4 + [429] * 4


async def test_a_flood_of_wrong_secrets_reads_the_store_once_per_recheck_interval(
    start_gateway: GatewayFactory,
) -> None:
    gateway = await start_gateway(failure_limit_per_source=1000, token_recheck_interval=3600)
    created = await gateway.create_token()
    assert (await gateway.call(created["token"])).status == 200
    reads = gateway.core.store.reads

    wrong = [str(issue_token("gw", created["id"])) for _ in range(20)]
    responses = await asyncio.gather(*(gateway.call(token) for token in wrong))
    assert [response.status for response in responses] == [401] * 20
    for _ in range(5):
        assert (await gateway.call(wrong[0])).status == 401

    assert gateway.core.store.reads - reads == 1


async def test_one_wrong_secret_sent_concurrently_costs_one_argon2_and_one_store_read(
    start_gateway: GatewayFactory,
) -> None:
    gateway = await start_gateway(failure_limit_per_source=1000, token_recheck_interval=3600)
    created = await gateway.create_token()
    assert (await gateway.call(created["token"])).status == 200
    reads, verifications = gateway.core.store.reads, gateway.core.hasher.verify_calls

    wrong = str(issue_token("gw", created["id"]))
    responses = await asyncio.gather(*(gateway.call(wrong) for _ in range(20)))

    assert [response.status for response in responses] == [401] * 20
    assert gateway.core.hasher.verify_calls - verifications == 1  # the store agreed: no argon2 against it
    assert gateway.core.store.reads - reads == 1


async def test_requests_failing_while_the_store_is_read_share_that_read(tmp_path: Path) -> None:
    # Even with no interval between rechecks, requests that fail while one is in flight wait for it.
    store = GatedStore(tmp_path / "tokens.db")
    await store.open()
    hasher = SecretHasher(Argon2Parameters(time_cost=1, memory_cost_kib=64))
    try:
        token = issue_token("gw", new_token_id())
        now = datetime.now(UTC)
        record = TokenRecord(
            id=token.token_id, name="n", access_level="read_only", allowed_ip_ranges=(), status=TokenStatus.ENABLED,
            expires_at=None, created_at=now, updated_at=now, rotated_at=None, last_used_at=None, last_used_ip=None,
            secret_hash=await hasher.hash(token.secret),
        )
        await store.insert_token(record, AuditEvent("token.create", "test", record.id, {}))
        cache = TokenCache(store, {}, recheck_interval=0)
        authenticator = Authenticator(cache, hasher, prefix="gw", limits=FailureLimits(per_source=1000))
        store.gate.set()
        await authenticator.authenticate(str(token), "192.0.2.1")
        store.gate.clear()
        store.read_done.clear()
        reads = store.reads

        wrong = str(issue_token("gw", token.token_id))
        attempts = [asyncio.ensure_future(authenticator.authenticate(wrong, "192.0.2.1")) for _ in range(15)]
        await asyncio.wait_for(store.read_done.wait(), timeout=10)
        assert not any(attempt.done() for attempt in attempts)  # all held by the one read
        store.gate.set()
        refusals = await asyncio.gather(*attempts, return_exceptions=True)

        assert [(error.status, error.code) for error in refusals] == [(401, "invalid_token")] * 15  # type: ignore[union-attr]
        assert store.reads - reads == 1
        assert hasher.verify_calls == 1 + 1
    finally:
        hasher.close()
        await store.close()
