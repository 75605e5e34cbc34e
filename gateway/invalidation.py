"""Each proxy process listens for token changes on Redis pub/sub and refreshes what it holds.

If the subscription drops, the process notices (the read fails, the ping fails, or the ping goes unanswered
for a poll interval, a second by default: a stopped or cut-off Redis keeps the connection open and silent),
keeps serving with entries no older than the cache ttl, reconnects with backoff, and on reconnect marks every
entry stale: whatever was published while it was away is picked up on next use. On a Redis Cluster the
subscription is on one node (a classic PUBLISH reaches every node); when it drops, the listener reads the
cluster's layout again and subscribes on the next node, so the loss of the node it listened on costs a
reconnect, not the channel.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.background import raise_if_cancelling
from gateway.metrics import Metrics
from gateway.redis_cluster import GatewayCluster, RedisClient
from gateway.redis_tokens import RedisTokens
from gateway.token_cache import TokenCache

log = logging.getLogger(__name__)


class InvalidationListener:
    def __init__(
        self,
        client: RedisClient,
        tokens: RedisTokens,
        cache: TokenCache,
        *,
        distrust_after_reconnect: float = 2.0,
        max_backoff: float = 2.0,
        poll_interval: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        """`poll_interval`: how long a quiet channel is waited on before a ping, and how long a ping may go
        unanswered before the connection counts as dead."""
        self._client = client
        self._tokens = tokens
        self._cache = cache
        self._distrust = distrust_after_reconnect
        self._max_backoff = max_backoff
        self._poll = poll_interval
        self._metrics = metrics or Metrics()
        self.connected = asyncio.Event()
        self.subscriptions = 0
        self.messages = 0
        self.node: str | None = None  # on a cluster, the node subscribed on (or last subscribed on)

    async def run(self) -> None:
        backoff = 0.05
        first = True
        while True:
            pubsub: redis.client.PubSub | None = None
            try:
                pubsub = await self._subscriber(reconnecting=not first)
                await pubsub.subscribe(self._tokens.keys.changes_channel)
                # The subscribe confirmation proves the connection; only then is the cache trusted again.
                while (await pubsub.get_message(timeout=self._poll)) is None:
                    pass
                if not first:
                    self._cache.invalidate_all()
                    self._tokens.distrust_for(self._distrust)
                    self._tokens.outage.recovered()
                    log.info("token change channel reconnected; cached tokens will be refreshed")
                self.subscriptions += 1
                self.connected.set()
                backoff = 0.05
                pinged = False
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._poll)
                    if message is None:
                        if pinged:  # open but silent (stopped, or cut off without a reset): as good as dead
                            raise RedisTimeoutError(f"no answer to a ping within {self._poll:g} s")
                        await pubsub.ping()  # a dead connection shows itself here, within a second or so
                        pinged = True
                        continue
                    pinged = False
                    if message.get("type") == "message":
                        self.messages += 1
                        self._received(message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                raise_if_cancelling()
                self._tokens.outage.failed(
                    error, "cached tokens are trusted for at most the cache ttl; reconnecting to its change channel"
                )
                self.connected.clear()
                first = False  # a subscription ends here (or by cancellation): the next one is a reconnect
                await asyncio.sleep(backoff)
                backoff = min(self._max_backoff, backoff * 2)
            finally:
                try:
                    if pubsub is not None:
                        await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
                except (RedisError, OSError):
                    pass

    async def _subscriber(self, *, reconnecting: bool) -> redis.client.PubSub:
        """One Redis's pub/sub; on a cluster, one node's: the next after the one lost, in a fresh layout."""
        client = self._client
        if not isinstance(client, GatewayCluster):
            return client.pubsub()
        if reconnecting:
            await client.refresh_layout()
        else:
            await client.initialize()
        pubsub = client.subscriber(self._tokens.keys.changes_channel, lost=self.node if reconnecting else None)
        node = pubsub.get_pubsub_node()
        self.node = None if node is None else node.name
        return pubsub

    def _received(self, data: bytes) -> None:
        """`<id>` or `<id> <commit unix time>` (redis_tokens.RedisTokens.publish)."""
        token_id, _, committed_at = data.partition(b" ")
        self._cache.invalidate(token_id.decode())
        if committed_at:
            try:
                lag = time.time() - float(committed_at)
            except ValueError:
                return
            self._metrics.propagation_seconds.observe(max(0.0, lag))
