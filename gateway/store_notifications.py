"""Each proxy process also hears of token changes from the store itself (PostgreSQL LISTEN/NOTIFY).

Redis pub/sub stays the fast path, but it is one component that can be down. The store announces every change
at commit, so with Redis down a disable, delete or rotate still reaches every proxy at once, rather than
after the cache ttl. A notified token that this process holds is read again from the store and replaced
(older versions never win); after the listening connection is lost and regained, every entry is refreshed
before its next use, since notifications sent meanwhile are gone.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.store.base import ChangeFeed, StoreUnavailable, TokenStore
from gateway.token_cache import TokenCache

log = logging.getLogger(__name__)


class StoreNotificationListener:
    def __init__(self, feed: ChangeFeed, store: TokenStore, cache: TokenCache) -> None:
        self._feed = feed
        self._store = store
        self._cache = cache
        self._refreshes: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self.connections = 0
        self.notifications = 0

    async def run(self) -> None:
        try:
            await self._feed.listen(self._changed, self._connected)
        finally:
            for task in self._refreshes:
                task.cancel()

    def _connected(self) -> None:
        if self.connections:
            self._cache.invalidate_all()
            log.info("store change notifications reconnected; cached tokens will be refreshed")
        self.connections += 1
        self.connected.set()

    def _changed(self, token_id: str) -> None:
        self.notifications += 1
        held = self._cache.peek(token_id) is not None
        self._cache.invalidate(token_id)  # also drops a read in flight, which may predate the change
        if held:
            task = asyncio.ensure_future(self._refresh(token_id))
            self._refreshes.add(task)
            task.add_done_callback(self._refreshes.discard)

    async def _refresh(self, token_id: str) -> None:
        try:
            record = await self._store.get_token(token_id)
        except StoreUnavailable:
            return  # the entry stays stale: its next use reads it again
        if record is None:
            self._cache.forget(token_id)
        else:
            self._cache.apply(record)
