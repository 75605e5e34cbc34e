"""Change delivery on its own: a real SQLite (or PostgreSQL) outbox, a real Redis, and what a second proxy reads.

Each test builds the delivering process in-process (store, RedisTokens, its own token cache, RedisTokenChanges)
and commits changes through the store, as the admin API does, then calls what the admin API calls. What other
proxies would see is read where they read it: the entry in Redis and the message on the change channel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as redis

from gateway.outage import describe
from gateway.redis_tokens import RedisTokens, connect, disconnect
from gateway.settings import Secret
from gateway.store import SQLiteStore
from gateway.store.base import StoreUnavailable, TokenStore
from gateway.store.postgres import PostgresStore
from gateway.token_cache import TokenCache
from gateway.token_changes import LocalTokenChanges, RedisTokenChanges
from gateway.token_format import new_token_id
from gateway.tokens import AuditEvent, TokenRecord, TokenStatus
from tests.conftest import Gateway, eventually
from tests.gateway.test_store_down import ruin_sqlite_file
from tests.redis_server import RedisServer, SentinelSet, free_port


def new_record() -> TokenRecord:
    now = datetime.now(UTC)
    return TokenRecord(
        id=new_token_id(),
        name="CRM sync",
        access_level="read_only",
        allowed_ip_ranges=(),
        status=TokenStatus.ENABLED,
        expires_at=None,
        created_at=now,
        updated_at=now,
        rotated_at=None,
        last_used_at=None,
        last_used_ip=None,
        secret_hash="$argon2id$v=19$m=1024,t=1,p=1$placeholder",
    )


async def create(store: TokenStore) -> TokenRecord:
    record = new_record()
    await store.insert_token(record, AuditEvent("token.create", "test", record.id, {}))
    return record


async def disable(store: TokenStore, token_id: str) -> TokenRecord:
    def change(current: TokenRecord) -> tuple[TokenRecord, AuditEvent]:
        changed = dataclasses.replace(
            current, status=TokenStatus.DISABLED, version=current.version + 1, updated_at=datetime.now(UTC)
        )
        return changed, AuditEvent("token.disable", "test", token_id, {})

    return await store.change_token(token_id, change)


async def delete(store: TokenStore, token_id: str) -> None:
    await store.delete_token(token_id, AuditEvent("token.delete", "test", token_id, {}))


async def pending_ids(store: TokenStore) -> list[str]:
    return [token_id for _, token_id in await store.pending_changes()]


@dataclass
class Delivery:
    """The delivering process, and a second proxy's view of Redis."""

    store: TokenStore
    client: redis.Redis
    tokens: RedisTokens
    cache: TokenCache
    changes: RedisTokenChanges
    heard: list[bytes]

    async def in_redis(self, token_id: str) -> bytes | None:
        raw = await self.client.get(self.tokens.keys.token(token_id))
        return None if raw is None else raw.partition(b"|")[2]

    async def status_in_redis(self, token_id: str) -> str | None:
        payload = await self.in_redis(token_id)
        return None if payload is None else json.loads(payload)["status"]

    async def until_heard(self, count: int) -> None:
        async def enough() -> bool:
            return len(self.heard) >= count

        await eventually(enough)


async def _listen(url: str, channel: str, heard: list[bytes], ready: asyncio.Event) -> None:
    """What every proxy hears: the messages on the change channel, from the subscribe confirmation on."""
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel)
        while (await pubsub.get_message(timeout=1.0)) is None:
            pass
        ready.set()
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                heard.append(message["data"])
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


MakeDelivery = Callable[..., Awaitable[Delivery]]
OpenPostgres = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
async def make_delivery(tmp_path: Path) -> AsyncIterator[MakeDelivery]:
    opened: list[tuple[TokenStore, redis.Redis]] = []
    listeners: list[asyncio.Task[None]] = []

    async def make(
        redis_url: str,
        *,
        store: TokenStore | None = None,
        client: redis.Redis | None = None,
        listen: bool = True,
        **options: object,
    ) -> Delivery:
        if store is None:
            store = SQLiteStore(tmp_path / "gateway.db", record_changes=True)
            await store.open()
        client = client or connect(redis_url)
        opened.append((store, client))
        tokens = RedisTokens(client, store)
        cache = TokenCache(tokens, {}, ttl=60.0, origin=store)
        changes = RedisTokenChanges(store, tokens, local_cache=cache, **options)  # type: ignore[arg-type]
        heard: list[bytes] = []
        if listen:
            ready = asyncio.Event()
            listeners.append(
                asyncio.ensure_future(_listen(redis_url, tokens.keys.changes_channel, heard, ready))
            )
            await asyncio.wait_for(ready.wait(), timeout=10)
        return Delivery(store, client, tokens, cache, changes, heard)

    yield make
    for task in listeners:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for store, client in reversed(opened):
        await disconnect(client)
        await store.close()


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)
    server.kill()


async def failed_at_least(tokens: RedisTokens, failures: int) -> bool:
    return tokens.outage.failures >= failures


async def test_a_change_is_written_to_redis_announced_with_its_commit_time_and_acknowledged(
    make_delivery: MakeDelivery, redis_url: str
) -> None:
    delivery: Delivery = await make_delivery(redis_url)
    record = await create(delivery.store)
    assert await delivery.changes.deliver() == 1
    assert delivery.changes.delivered == 1
    assert await pending_ids(delivery.store) == []
    await delivery.until_heard(1)

    disabled = await disable(delivery.store, record.id)
    await delivery.changes.changed(disabled)

    assert await delivery.status_in_redis(record.id) == "disabled"
    assert await pending_ids(delivery.store) == []
    await delivery.until_heard(2)
    assert delivery.heard[1] == f"{record.id} {disabled.updated_at.timestamp():.6f}".encode()
    assert delivery.changes.delivered == 2
    assert await delivery.changes.deliver() == 0  # nothing left


async def test_the_delivering_process_holds_the_change_before_changed_returns(
    make_delivery: MakeDelivery, redis_url: str
) -> None:
    """Its own proxy plane answers from the change at once, not once its message comes back."""
    delivery: Delivery = await make_delivery(redis_url, listen=False)
    record = await create(delivery.store)
    await delivery.changes.changed(record)
    entry = await delivery.cache.get(record.id)
    assert entry is not None and entry.enabled

    await delivery.changes.changed(await disable(delivery.store, record.id))
    entry = delivery.cache.peek(record.id)
    assert entry is not None and not entry.enabled

    await delete(delivery.store, record.id)
    await delivery.changes.deleted(record.id)
    assert delivery.cache.peek(record.id) is None


async def test_a_delete_leaves_a_tombstone_and_is_announced_without_a_time(
    make_delivery: MakeDelivery, redis_url: str
) -> None:
    delivery: Delivery = await make_delivery(redis_url)
    record = await create(delivery.store)
    await delivery.changes.changed(record)
    await delete(delivery.store, record.id)

    await delivery.changes.deleted(record.id)

    assert await delivery.in_redis(record.id) == b"deleted"
    await delivery.until_heard(2)
    assert delivery.heard[1] == record.id.encode()
    assert await pending_ids(delivery.store) == []


async def test_many_changes_of_one_token_are_delivered_once_and_counted_by_token(
    make_delivery: MakeDelivery, redis_url: str
) -> None:
    delivery: Delivery = await make_delivery(redis_url)
    first, second = await create(delivery.store), await create(delivery.store)
    await disable(delivery.store, first.id)
    assert len(await delivery.store.pending_changes()) == 3

    assert await delivery.changes.deliver() == 2

    await delivery.until_heard(2)
    assert [message.split(b" ")[0] for message in delivery.heard] == [first.id.encode(), second.id.encode()]
    assert delivery.changes.delivered == 2
    await create(delivery.store)
    assert await delivery.changes.deliver() == 1
    assert delivery.changes.delivered == 3


async def test_a_change_committed_while_a_delivery_runs_stays_in_the_outbox_for_the_next(
    make_delivery: MakeDelivery, redis_url: str, tmp_path: Path
) -> None:
    from tests.conftest import GatedStore

    writer = SQLiteStore(tmp_path / "gateway.db", record_changes=True)
    await writer.open()
    try:
        gated = GatedStore(tmp_path / "gateway.db")
        await gated.open()
        delivery: Delivery = await make_delivery(redis_url, store=gated, listen=False)
        first = await create(writer)
        delivering = asyncio.ensure_future(delivery.changes.deliver())
        await gated.read_done.wait()  # the delivery read the outbox and is reading the token ...
        later = await create(writer)  # ... when another change commits
        gated.gate.set()
        assert await delivering == 1

        assert await pending_ids(writer) == [later.id]
        assert await delivery.changes.deliver() == 1
        assert await pending_ids(writer) == []
        assert await delivery.status_in_redis(first.id) == "enabled"
    finally:
        await writer.close()


async def test_redis_down_leaves_the_change_in_the_outbox_and_the_retry_loop_delivers_it_when_back(
    make_delivery: MakeDelivery, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    delivery: Delivery = await make_delivery(own_redis.url, listen=False)
    record = await create(delivery.store)
    own_redis.kill()

    await delivery.changes.changed(record)  # committed: the admin API answers all the same

    assert await pending_ids(delivery.store) == [record.id]
    [line] = [r for r in caplog.records if r.name == "gateway.redis_tokens"]
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith(f"redis at 127.0.0.1:{own_redis.port} is failing (ConnectionError: ")
    assert line.getMessage().endswith(
        "; token changes are committed and wait in the outbox, delivered every second until it answers"
    )

    retrying = asyncio.ensure_future(delivery.changes.run(interval=0.01))
    try:
        await eventually(lambda: failed_at_least(delivery.tokens, 3))
        again = [r.getMessage() for r in caplog.records if r.name == "gateway.redis_tokens"][1:]
        assert again and all(
            m.startswith(f"redis at 127.0.0.1:{own_redis.port} still fails: ConnectionError: ") for m in again
        ), again
        own_redis.start()

        async def delivered() -> bool:
            return await pending_ids(delivery.store) == []

        await eventually(delivered)
        assert await delivery.status_in_redis(record.id) == "enabled"
        assert not delivery.tokens.outage.down
        assert caplog.records[-1].getMessage().startswith(f"redis at 127.0.0.1:{own_redis.port} answers again")
    finally:
        retrying.cancel()
        await asyncio.gather(retrying, return_exceptions=True)


async def test_the_retry_loop_names_what_failed_when_redis_fails_first(
    make_delivery: MakeDelivery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    port = free_port()  # nothing listens there
    delivery: Delivery = await make_delivery(f"redis://127.0.0.1:{port}/0", listen=False)
    record = await create(delivery.store)

    retrying = asyncio.ensure_future(delivery.changes.run(interval=0.01))
    try:
        await eventually(lambda: failed_at_least(delivery.tokens, 2))
    finally:
        retrying.cancel()
        await asyncio.gather(retrying, return_exceptions=True)

    first = next(r for r in caplog.records if r.name == "gateway.redis_tokens")
    assert first.levelno == logging.WARNING
    assert first.getMessage().startswith(f"redis at 127.0.0.1:{port} is failing (ConnectionError: ")
    assert first.getMessage().endswith("); token changes wait in the outbox until it answers")
    assert await pending_ids(delivery.store) == [record.id]


async def test_a_store_that_cannot_be_read_is_logged_by_delivery_and_by_the_retry_loop(
    make_delivery: MakeDelivery, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    delivery: Delivery = await make_delivery(redis_url, listen=False)
    record = await create(delivery.store)
    ruin_sqlite_file(tmp_path / "gateway.db")
    with pytest.raises(StoreUnavailable) as raised:
        await delivery.store.pending_changes()
    reason = describe(raised.value)
    assert reason.startswith("StoreUnavailable: ")

    await delivery.changes.changed(record)

    warnings = [r for r in caplog.records if r.name == "gateway.token_changes"]
    assert [(r.levelno, r.getMessage()) for r in warnings] == [
        (logging.WARNING, f"token change committed but not yet delivered ({reason}); retrying")
    ]
    retrying = asyncio.ensure_future(delivery.changes.run(interval=0.01))
    try:
        async def retried() -> bool:
            return sum(r.name == "gateway.token_changes" for r in caplog.records) >= 3

        await eventually(retried)
    finally:
        retrying.cancel()
        await asyncio.gather(retrying, return_exceptions=True)
    retries = [r for r in caplog.records if r.name == "gateway.token_changes"][1:]
    assert {(r.levelno, r.getMessage()) for r in retries} == {(logging.DEBUG, f"outbox delivery failed: {reason}")}
    assert not delivery.tokens.outage.down  # Redis was never the problem


async def test_a_redis_that_stops_answering_holds_the_admin_api_up_for_the_delivery_timeout_only(
    make_delivery: MakeDelivery, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    # A client without a socket timeout: only the delivery timeout can end the wait.
    client = redis.Redis.from_url(own_redis.url)
    delivery: Delivery = await make_delivery(
        own_redis.url, client=client, listen=False, delivery_timeout=0.05
    )
    record = await create(delivery.store)
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)  # connected, but silent
    try:
        await asyncio.wait_for(delivery.changes.changed(record), timeout=10)
        assert await pending_ids(delivery.store) == [record.id]
        [line] = [r.getMessage() for r in caplog.records if r.name == "gateway.redis_tokens"]
        assert line == (
            f"redis at 127.0.0.1:{own_redis.port} is failing (TimeoutError); token changes are committed and wait"
            " in the outbox, delivered every second until it answers"
        )
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    # The delivery that was cut short goes on, and a later one finds the outbox empty or empties it.
    await asyncio.wait_for(delivery.changes.deliver(), timeout=10)
    assert await pending_ids(delivery.store) == []
    assert await delivery.status_in_redis(record.id) == "enabled"


async def test_one_retry_loop_per_process_and_a_new_one_after_the_first_is_cancelled(
    make_delivery: MakeDelivery, own_redis: RedisServer
) -> None:
    delivery: Delivery = await make_delivery(own_redis.url, listen=False)
    first = asyncio.ensure_future(delivery.changes.run(interval=0.01))
    await asyncio.sleep(0)
    await asyncio.wait_for(delivery.changes.run(interval=0.01), timeout=10)  # a second caller returns at once
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)

    own_redis.kill()
    record = await create(delivery.store)
    await delivery.changes.changed(record)
    assert await pending_ids(delivery.store) == [record.id]
    own_redis.start()
    again = asyncio.ensure_future(delivery.changes.run(interval=0.01))
    try:
        async def delivered() -> bool:
            return await pending_ids(delivery.store) == []

        await eventually(delivered)
    finally:
        again.cancel()
        await asyncio.gather(again, return_exceptions=True)


async def test_one_process_alone_writes_a_delete_through_to_its_cache(gateway: Gateway) -> None:
    assert isinstance(gateway.core.changes, LocalTokenChanges)
    created = await gateway.create_token()
    assert (await gateway.call(created["token"])).status == 200

    status, _ = await gateway.admin_call("DELETE", f"/v1/tokens/{created['id']}")

    assert status == 204
    response = await gateway.call(created["token"])
    assert (response.status, (await response.json())["code"]) == (401, "invalid_token")


# --- one process at a time delivers, on PostgreSQL -------------------------------------------------------


@pytest.fixture
async def postgres_stores(postgres_url: str) -> AsyncIterator[OpenPostgres]:
    opened: list[PostgresStore] = []

    async def open_store(**options: object) -> PostgresStore:
        store = PostgresStore(Secret(postgres_url), record_changes=True, migrate=not opened, **options)  # type: ignore[arg-type]
        await store.open()
        opened.append(store)
        return store

    yield open_store
    for store in reversed(opened):
        await store.close()


async def test_on_postgres_a_process_without_the_turn_leaves_the_outbox_to_the_one_holding_it(
    make_delivery: MakeDelivery, postgres_stores: OpenPostgres, redis_url: str
) -> None:
    holder: PostgresStore = await postgres_stores()
    store: PostgresStore = await postgres_stores()
    delivery: Delivery = await make_delivery(redis_url, store=store, turn=store.delivery_turn, listen=False)
    record = await create(store)

    async with holder.delivery_turn(wait=True) as mine:
        assert mine
        assert await delivery.changes.deliver(wait=False) == 0
        assert await pending_ids(store) == [record.id]
        waiting = asyncio.ensure_future(delivery.changes.deliver())  # waits for its turn
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert not waiting.done()
    assert await asyncio.wait_for(waiting, timeout=10) == 1
    assert await pending_ids(store) == []
    assert await delivery.status_in_redis(record.id) == "enabled"

    await delivery.changes.changed(await disable(store, record.id))
    assert await pending_ids(store) == []
    assert await delivery.status_in_redis(record.id) == "disabled"


async def test_on_postgres_the_retry_loop_does_not_queue_for_the_turn(
    make_delivery: MakeDelivery, postgres_stores: OpenPostgres, redis_url: str
) -> None:
    """With one pooled connection, a loop waiting for the lock would hold it, and the proxy could read no token."""
    holder: PostgresStore = await postgres_stores()
    store: PostgresStore = await postgres_stores(pool_size=1)
    delivery: Delivery = await make_delivery(redis_url, store=store, turn=store.delivery_turn, listen=False)
    record = await create(store)

    async with holder.delivery_turn(wait=True):
        retrying = asyncio.ensure_future(delivery.changes.run(interval=0.01))
        try:
            for _ in range(10):
                await asyncio.sleep(0.01)
                found = await asyncio.wait_for(store.get_token(record.id), timeout=5)
                assert found is not None
            assert await pending_ids(store) == [record.id]
        finally:
            retrying.cancel()
            await asyncio.gather(retrying, return_exceptions=True)


# --- with Sentinel, a change counts once a replica holds it -----------------------------------------------


@pytest.fixture
async def one_sentinel(tmp_path: Path) -> AsyncIterator[SentinelSet]:
    watched = SentinelSet(tmp_path / "sentinel", count=1)
    try:
        await asyncio.to_thread(watched.start)
        yield watched
    finally:
        if watched.replica.process is not None and watched.replica.process.poll() is None:
            watched.replica.process.send_signal(signal.SIGCONT)
        watched.stop()


async def test_with_sentinel_a_change_no_replica_confirmed_stays_in_the_outbox_until_one_does(
    make_delivery: MakeDelivery, one_sentinel: SentinelSet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    client = connect(one_sentinel.url())
    delivery: Delivery = await make_delivery(one_sentinel.primary.url, client=client, listen=False)
    record = await create(delivery.store)
    assert await delivery.changes.deliver() == 1  # the replica confirms
    assert await pending_ids(delivery.store) == []

    assert one_sentinel.replica.process is not None
    one_sentinel.replica.process.send_signal(signal.SIGSTOP)
    try:
        await delivery.changes.changed(await disable(delivery.store, record.id))
        assert await delivery.status_in_redis(record.id) == "disabled"  # the primary has it ...
        assert await pending_ids(delivery.store) == [record.id]  # ... but it is not delivered yet
        assert any("NotReplicated: no replica confirmed the change" in r.getMessage() for r in caplog.records)
    finally:
        one_sentinel.replica.process.send_signal(signal.SIGCONT)
    assert await delivery.changes.deliver() == 1
    assert await pending_ids(delivery.store) == []
