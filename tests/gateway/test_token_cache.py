"""The in-process token cache: a read that raced a change never brings the old token back."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import UTC, datetime, timedelta
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.authenticator import Authenticator
from gateway.failure_limits import FailureLimits
from gateway.problems import GatewayError
from gateway.store import SQLiteStore, StoreUnavailable
from gateway.token_cache import TokenCache
from tests.conftest import GatedStore, Gateway, GatewayFactory
from tests.gateway.test_store_down import ruin_the_store


@pytest.fixture
async def gated_cache(gateway: Gateway) -> AsyncIterator[tuple[TokenCache, GatedStore]]:
    store = GatedStore(gateway.database)
    await store.open()
    yield TokenCache(store, gateway.core.settings.access_levels), store
    await store.close()


async def test_fill_that_read_before_a_disable_cannot_reenable_the_token(
    gateway: Gateway, gated_cache: tuple[TokenCache, GatedStore]
) -> None:
    cache, gated = gated_cache
    created = await gateway.create_token()
    filling = asyncio.ensure_future(cache.get(created["id"]))
    await gated.read_done.wait()  # the fill has read the enabled token ...
    status, _ = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    assert status == 200
    disabled = await gateway.core.store.get_token(created["id"])
    assert disabled is not None
    cache.apply(disabled)  # ... the change is written through ...
    gated.gate.set()  # ... and only then does the fill's answer arrive.
    entry = await filling
    assert entry is not None and not entry.enabled
    assert cache.peek(created["id"]) is entry


async def test_fill_that_read_before_a_delete_cannot_resurrect_the_token(
    gateway: Gateway, gated_cache: tuple[TokenCache, GatedStore]
) -> None:
    cache, gated = gated_cache
    created = await gateway.create_token()
    filling = asyncio.ensure_future(cache.get(created["id"]))
    await gated.read_done.wait()
    status, _ = await gateway.admin_call("DELETE", f"/v1/tokens/{created['id']}")
    assert status == 204
    cache.forget(created["id"])
    gated.gate.set()
    assert await filling is None
    assert cache.peek(created["id"]) is None


async def test_an_older_version_never_replaces_a_newer_one(gateway: Gateway) -> None:
    created = await gateway.create_token()
    old = await gateway.core.store.get_token(created["id"])
    assert old is not None
    await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    gateway.core.tokens.apply(old)
    assert (await gateway.call(created["token"])).status == 401


async def test_cache_is_bounded(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(cache_max_entries=3)
    tokens = [(await gateway.create_token(name=f"t{i}"))["token"] for i in range(6)]
    for token in tokens:
        assert (await gateway.call(token)).status == 200
    assert len(gateway.core.tokens) == 3  # the most recent three, not fewer



@pytest.fixture
async def counting_store(gateway: Gateway) -> AsyncIterator[SQLiteStore]:
    """A store of its own on the gateway's file: its `reads` are the token reads of the cache under test."""
    assert gateway.database is not None
    store = SQLiteStore(gateway.database)
    await store.open()
    yield store
    await store.close()


def watched_cache(gateway: Gateway, store: SQLiteStore, **options: Any) -> tuple[TokenCache, list[str | None]]:
    """A cache over `store`, and the ids its listeners were told about (None: every entry)."""
    cache = TokenCache(store, gateway.core.settings.access_levels, **options)
    told: list[str | None] = []
    cache.listeners.append(told.append)
    return cache, told


async def test_a_forgotten_token_is_answered_unknown_without_a_store_read(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    created = await gateway.create_token()
    cache, told = watched_cache(gateway, counting_store, negative_ttl=0.5)
    assert await cache.get(created["id"]) is not None
    status, _ = await gateway.admin_call("DELETE", f"/v1/tokens/{created['id']}")
    assert status == 204
    cache.forget(created["id"])
    assert cache.peek(created["id"]) is None
    assert await cache.get(created["id"]) is None
    assert (counting_store.reads, told) == (1, [created["id"]])


async def test_without_a_negative_ttl_a_forgotten_token_is_read_again(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    created = await gateway.create_token()
    cache, _ = watched_cache(gateway, counting_store, negative_ttl=0)
    assert await cache.get(created["id"]) is not None
    cache.forget(created["id"])
    assert len(cache) == 0
    assert await cache.get(created["id"]) is not None  # still in the store: the cache keeps nothing to say no
    assert counting_store.reads == 2


async def test_a_recheck_reads_the_store_once_per_interval_whichever_entry_asks(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    created = await gateway.create_token()
    cache, _ = watched_cache(gateway, counting_store, recheck_interval=60)
    older = await cache.get(created["id"])
    record = await counting_store.get_token(created["id"])
    assert older is not None and record is not None
    cache.apply(dataclasses.replace(record, version=record.version + 1))
    current = cache.peek(created["id"])
    assert current is not None and current is not older
    reads = counting_store.reads
    assert await cache.recheck(current) is None  # the store agrees: nothing to answer with
    assert counting_store.reads == reads + 1
    assert await cache.recheck(older) is None
    assert await cache.recheck(older) is None
    assert await cache.recheck(current) is None
    assert counting_store.reads == reads + 1


async def test_a_recheck_through_an_old_entry_marks_the_current_one_too(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    created = await gateway.create_token()
    cache, _ = watched_cache(gateway, counting_store, recheck_interval=60)
    older = await cache.get(created["id"])
    record = await counting_store.get_token(created["id"])
    assert older is not None and record is not None
    cache.apply(dataclasses.replace(record, version=record.version + 1))
    current = cache.peek(created["id"])
    assert current is not None
    reads = counting_store.reads
    assert await cache.recheck(older) is None
    assert await cache.recheck(current) is None
    assert await cache.recheck(older) is None
    assert counting_store.reads == reads + 1


async def test_with_no_interval_every_recheck_reads_the_store(gateway: Gateway, counting_store: SQLiteStore) -> None:
    created = await gateway.create_token()
    cache, _ = watched_cache(gateway, counting_store, recheck_interval=0)
    entry = await cache.get(created["id"])
    assert entry is not None
    for _ in range(3):
        assert await cache.recheck(entry) is None
    assert counting_store.reads == 1 + 3


async def test_a_recheck_that_finds_the_same_version_changes_nothing(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    created = await gateway.create_token()
    cache, told = watched_cache(gateway, counting_store)
    entry = await cache.get(created["id"])
    assert entry is not None
    assert await cache.recheck(entry) is None
    assert cache.peek(created["id"]) is entry
    assert told == []


async def test_a_recheck_finds_a_rotation_the_cache_missed_even_with_nothing_cached(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    created = await gateway.create_token()
    cache, told = watched_cache(gateway, counting_store)
    entry = await cache.get(created["id"])
    assert entry is not None
    status, rotated = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/rotate")
    assert status == 200
    cache.clear()
    fresh = await cache.recheck(entry)
    assert fresh is not None and fresh.record.version == rotated["version"]
    assert fresh.record.secret_hash != entry.record.secret_hash
    assert cache.peek(created["id"]) is fresh
    assert told == [created["id"]]


async def test_a_recheck_that_finds_the_token_deleted_forgets_it(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    created = await gateway.create_token()
    cache, told = watched_cache(gateway, counting_store)
    entry = await cache.get(created["id"])
    assert entry is not None
    status, _ = await gateway.admin_call("DELETE", f"/v1/tokens/{created['id']}")
    assert status == 204
    assert await cache.recheck(entry) is None
    assert cache.peek(created["id"]) is None
    assert await cache.get(created["id"]) is None
    assert (counting_store.reads, told) == (2, [created["id"]])


async def test_an_invalidated_token_is_read_again_and_its_listeners_are_told_which(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    first, second = await gateway.create_token(), await gateway.create_token()
    cache, told = watched_cache(gateway, counting_store, ttl=60)  # a ttl, as with Redis
    for created in (first, second):
        assert await cache.get(created["id"]) is not None
    cache.invalidate(first["id"])
    assert told == [first["id"]]
    assert await cache.get(first["id"]) is not None
    assert await cache.get(second["id"]) is not None
    assert counting_store.reads == 3
    cache.invalidate_all()
    assert told == [first["id"], None]
    assert await cache.get(second["id"]) is not None
    assert counting_store.reads == 4


async def test_a_failed_store_read_reaches_every_waiter_and_leaves_nothing_behind(
    gateway: Gateway, counting_store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    created = await gateway.create_token()
    cache, _ = watched_cache(gateway, counting_store)
    ruin_the_store(gateway)

    answers = await asyncio.gather(cache.get(created["id"]), cache.get(created["id"]), return_exceptions=True)

    assert [type(answer) for answer in answers] == [StoreUnavailable, StoreUnavailable]
    assert counting_store.reads == 1  # the one read both waited for
    assert len(cache) == 0  # neither the token nor its absence is remembered
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


@pytest.mark.parametrize(
    ("negative_ttl", "counts"),
    [
        (0.5, (4, 3, 2, 1)),  # the unknown id is remembered: its second lookup is answered from memory
        (0.0, (2, 5, 2, 3)),  # nothing remembered: the store is asked, and says no, each time
    ],
)
async def test_the_cache_counts_its_answers_and_what_the_store_said(
    gateway: Gateway, counting_store: SQLiteStore, negative_ttl: float, counts: tuple[int, int, int, int]
) -> None:
    """(hits, misses, found in the store, missing from it): the proxy's lookup metrics."""
    first, second = await gateway.create_token(), await gateway.create_token()
    cache, _ = watched_cache(gateway, counting_store, negative_ttl=negative_ttl)
    for token_id in (first["id"], first["id"], first["id"], second["id"], *["AAAAAAAAAAAAAAAA"] * 3):
        await cache.get(token_id)
    assert (cache.hits, cache.misses, cache.source_found, cache.source_missing) == counts


async def test_a_refreshed_entry_keeps_what_argon2_proved_while_the_hashes_are_unchanged(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    created = await gateway.create_token()
    cache, _ = watched_cache(gateway, counting_store, ttl=60)
    hasher = gateway.core.hasher
    authenticator = Authenticator(
        cache, hasher, prefix=gateway.core.settings.token_prefix, limits=FailureLimits(per_source=1000)
    )
    await authenticator.authenticate(created["token"], "192.0.2.1")
    verified = hasher.verify_calls
    cache.invalidate(created["id"])  # as a change message would: the entry is read again before its next use

    await authenticator.authenticate(created["token"], "192.0.2.1")

    assert counting_store.reads == 2
    assert hasher.verify_calls == verified  # the secret's proof was carried over to the refreshed entry


async def test_a_source_answering_an_older_version_does_not_replace_the_newer_entry(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    created = await gateway.create_token()
    cache, _ = watched_cache(gateway, counting_store, ttl=60)
    record = await counting_store.get_token(created["id"])
    assert record is not None
    cache.apply(dataclasses.replace(record, version=record.version + 1, name="written through"))
    cache.invalidate(created["id"])

    refreshed = await cache.get(created["id"])  # the store still answers the older version
    again = await cache.get(created["id"])

    assert refreshed is not None and refreshed.record.name == "written through"
    assert again is refreshed
    assert counting_store.reads == 1 + 1  # the refresh counts as one: the entry is trusted again after it


async def test_a_token_found_deleted_on_refresh_leaves_no_entry_without_a_negative_ttl(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    created = await gateway.create_token()
    cache, _ = watched_cache(gateway, counting_store, ttl=60, negative_ttl=0)
    assert await cache.get(created["id"]) is not None
    status, _ = await gateway.admin_call("DELETE", f"/v1/tokens/{created['id']}")
    assert status == 204
    cache.invalidate(created["id"])

    assert await cache.get(created["id"]) is None
    assert (len(cache), cache.peek(created["id"])) == (0, None)


async def test_the_fast_path_answers_only_a_fresh_entry_and_counts_it_a_hit(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    created = await gateway.create_token()
    cache, _ = watched_cache(gateway, counting_store, ttl=60)
    entry = await cache.get(created["id"])

    assert cache.get_fresh(created["id"]) is entry
    assert cache.get_fresh(created["id"]) is entry
    assert cache.get_fresh("AAAAAAAAAAAAAAAA") is None
    cache.invalidate(created["id"])
    assert cache.get_fresh(created["id"]) is None  # stale: only `get` may refresh it
    assert (cache.hits, cache.misses) == (2, 1)


async def test_a_write_through_replaces_a_remembered_absence(gateway: Gateway, counting_store: SQLiteStore) -> None:
    created = await gateway.create_token()
    cache, _ = watched_cache(gateway, counting_store)
    record = await counting_store.get_token(created["id"])
    assert record is not None
    newcomer = dataclasses.replace(record, id="AAAAAAAAAAAAAAAA")
    assert await cache.get(newcomer.id) is None  # remembered as unknown ...

    cache.apply(newcomer)  # ... until a change for that id is written through

    entry = await cache.get(newcomer.id)
    assert entry is not None and entry.record is newcomer


class Judge:
    """An authenticator over a cache of its own, counting the argon2 verifications each secret costs."""

    def __init__(self, gateway: Gateway, cache: TokenCache, store: SQLiteStore) -> None:
        self.gateway, self.cache, self.store = gateway, cache, store
        self.authenticator = Authenticator(
            cache, gateway.core.hasher, prefix=gateway.core.settings.token_prefix, limits=FailureLimits(per_source=1000)
        )

    async def write_through(self, token_id: str) -> None:
        """What the admin plane does after a commit: the store's record, applied to the cache."""
        record = await self.store.get_token(token_id)
        assert record is not None
        self.cache.apply(record)

    async def verdict(self, token: str) -> tuple[str, int]:
        """('ok' or the refusal's code, argon2 verifications it cost)."""
        before = self.gateway.core.hasher.verify_calls
        try:
            await self.authenticator.authenticate(token, "192.0.2.1")
            answer = "ok"
        except GatewayError as refused:
            answer = refused.code
        return answer, self.gateway.core.hasher.verify_calls - before


async def test_an_expired_token_is_refused_from_its_cached_entry(gateway: Gateway, counting_store: SQLiteStore) -> None:
    created = await gateway.create_token()
    cache, _ = watched_cache(gateway, counting_store)
    judge = Judge(gateway, cache, counting_store)
    assert await judge.verdict(created["token"]) == ("ok", 1)
    record = await counting_store.get_token(created["id"])
    assert record is not None
    cache.apply(dataclasses.replace(record, version=record.version + 1, expires_at=datetime.now(UTC) - timedelta(seconds=1)))

    assert (await judge.verdict(created["token"]))[0] == "token_expired"


async def test_what_argon2_proved_follows_each_secret_through_rotation_and_grace(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    created = await gateway.create_token()
    token_id, first = created["id"], created["token"]
    cache, _ = watched_cache(gateway, counting_store)
    judge = Judge(gateway, cache, counting_store)
    assert await judge.verdict(first) == ("ok", 1)

    status, rotated = await gateway.admin_call("POST", f"/v1/tokens/{token_id}/rotate", json={"grace_seconds": 600})
    assert status == 200
    await judge.write_through(token_id)
    assert await judge.verdict(first) == ("ok", 0)  # the old secret, in grace, is known without argon2
    assert await judge.verdict(rotated["token"]) == ("ok", 1)

    status, _ = await gateway.admin_call("PATCH", f"/v1/tokens/{token_id}", json={"name": "renamed"})
    assert status == 200
    await judge.write_through(token_id)
    assert await judge.verdict(first) == ("ok", 0)  # an edit leaves both proofs in place
    assert await judge.verdict(rotated["token"]) == ("ok", 0)

    status, _ = await gateway.admin_call("POST", f"/v1/tokens/{token_id}/end-grace")
    assert status == 200
    await judge.write_through(token_id)
    assert await judge.verdict(first) == ("invalid_token", 0)  # known revoked: refused without argon2
    assert await judge.verdict(rotated["token"]) == ("ok", 0)


async def test_a_rotation_without_grace_remembers_both_old_secrets_as_revoked(
    gateway: Gateway, counting_store: SQLiteStore
) -> None:
    created = await gateway.create_token()
    token_id, first = created["id"], created["token"]
    cache, _ = watched_cache(gateway, counting_store)
    judge = Judge(gateway, cache, counting_store)
    assert await judge.verdict(first) == ("ok", 1)
    status, second = await gateway.admin_call("POST", f"/v1/tokens/{token_id}/rotate", json={"grace_seconds": 600})
    assert status == 200
    await judge.write_through(token_id)
    assert await judge.verdict(second["token"]) == ("ok", 1)
    assert await judge.verdict(first) == ("ok", 0)

    status, third = await gateway.admin_call("POST", f"/v1/tokens/{token_id}/rotate")
    assert status == 200
    await judge.write_through(token_id)

    assert await judge.verdict(first) == ("invalid_token", 0)
    assert await judge.verdict(second["token"]) == ("invalid_token", 0)
    assert await judge.verdict(third["token"]) == ("ok", 1)


async def test_at_most_four_revoked_secrets_are_remembered(gateway: Gateway, counting_store: SQLiteStore) -> None:
    created = await gateway.create_token()
    cache, _ = watched_cache(gateway, counting_store)
    judge = Judge(gateway, cache, counting_store)
    tokens = [created["token"]]
    assert await judge.verdict(tokens[0]) == ("ok", 1)
    for _ in range(5):
        status, rotated = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/rotate")
        assert status == 200
        await judge.write_through(created["id"])
        tokens.append(rotated["token"])
        assert await judge.verdict(tokens[-1]) == ("ok", 1)

    assert [await judge.verdict(token) for token in tokens[1:5]] == [("invalid_token", 0)] * 4
    assert (await judge.verdict(tokens[0]))[1] >= 1  # the oldest is forgotten: argon2 judges it again
