"""How a committed token change reaches every proxy.

In one process, the admin API writes the change straight into the token cache. With Redis, each change is
also in the store's outbox (written in the same transaction); delivering it means writing the current record
(or a tombstone) to Redis, publishing the id on the change channel, then acknowledging the outbox. Delivery is
attempted at once, before the admin API answers, and retried every second until Redis takes it, so a change
made while Redis is down still arrives when it returns.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from redis.exceptions import RedisError

from gateway.background import raise_if_cancelling
from gateway.outage import describe
from gateway.redis_tokens import RedisTokens
from gateway.store.base import StoreUnavailable, TokenStore
from gateway.token_cache import TokenCache
from gateway.tokens import TokenRecord

log = logging.getLogger(__name__)


class DeliveryTurn(Protocol):
    def __call__(self, *, wait: bool) -> AbstractAsyncContextManager[bool]: ...


class TokenChanges(Protocol):
    async def changed(self, record: TokenRecord) -> None: ...

    async def deleted(self, token_id: str) -> None: ...


class LocalTokenChanges:
    """One process: write the change through to the in-process cache."""

    def __init__(self, cache: TokenCache) -> None:
        self._cache = cache

    async def changed(self, record: TokenRecord) -> None:
        self._cache.apply(record)

    async def deleted(self, token_id: str) -> None:
        self._cache.forget(token_id)


class RedisTokenChanges:
    """Many processes: deliver the store's outbox to Redis, then to every proxy by pub/sub."""

    def __init__(
        self,
        store: TokenStore,
        tokens: RedisTokens,
        *,
        local_cache: TokenCache | None = None,
        delivery_timeout: float = 1.0,
        turn: DeliveryTurn | None = None,
    ) -> None:
        """`turn`, when the store offers one, lets one process at a time deliver: then every process (the
        proxies too) runs the delivery loop, and the outbox drains while any of them is up."""
        self._store = store
        self.turn = turn
        self._tokens = tokens
        self._local = local_cache
        self._delivery_timeout = delivery_timeout
        self._lock = asyncio.Lock()
        self.delivered = 0
        self._running = False

    async def changed(self, record: TokenRecord) -> None:
        if self._local is not None:
            self._local.apply(record)
        await self._deliver_soon()

    async def deleted(self, token_id: str) -> None:
        if self._local is not None:
            self._local.forget(token_id)
        await self._deliver_soon()

    async def _deliver_soon(self) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.deliver()), timeout=self._delivery_timeout)
        except StoreUnavailable as error:
            log.warning("token change committed but not yet delivered (%s); retrying", describe(error))
        except (TimeoutError, RedisError, OSError) as error:
            self._tokens.outage.failed(
                error, "token changes are committed and wait in the outbox, delivered every second until it answers"
            )

    async def deliver(self, *, wait: bool = True) -> int:
        """Deliver every pending change; returns how many token ids were published. With `wait` False, give
        up at once if another process is delivering."""
        async with self._lock:
            if self.turn is None:
                return await self._deliver_pending()
            async with self.turn(wait=wait) as mine:
                return await self._deliver_pending() if mine else 0

    async def _deliver_pending(self) -> int:
        pending = await self._store.pending_changes()
        if not pending:
            return 0
        token_ids = list(dict.fromkeys(token_id for _, token_id in pending))
        entries = [(token_id, await self._store.get_token(token_id)) for token_id in token_ids]
        await self._tokens.deliver(entries)
        if self._tokens.outage.down:
            self._tokens.outage.recovered()
        await self._store.acknowledge_changes(pending[-1][0])
        self.delivered += len(token_ids)
        return len(token_ids)

    async def run(self, interval: float = 1.0) -> None:
        """Retry delivery until cancelled (it only has work after Redis was unreachable). One loop per
        process: a second caller (both planes in one process) returns at once."""
        if self._running:
            return
        self._running = True
        try:
            await self._retry(interval)
        finally:
            self._running = False

    async def _retry(self, interval: float) -> None:
        while True:
            try:
                await self.deliver(wait=False)
            except StoreUnavailable as error:
                raise_if_cancelling()
                log.debug("outbox delivery failed: %s", describe(error))
            except (RedisError, OSError) as error:
                raise_if_cancelling()
                self._tokens.outage.failed(error, "token changes wait in the outbox until it answers")
            await asyncio.sleep(interval)
