"""The in-process token cache: a read that raced a change never brings the old token back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.token_cache import TokenCache
from tests.conftest import GatedStore, Gateway, GatewayFactory


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
    assert len(gateway.core.tokens) <= 3
