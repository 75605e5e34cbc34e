"""Redis Cluster as the gateway's Redis: redis-py's asyncio cluster client, failing as any Redis fails.

The cluster client routes each key's command to the primary serving its slot and follows MOVED and ASK; the
gateway's keys are each touched alone (an entry, a usage hash, a count hash), and the rate limit script's two
keys share the token id as a hash tag, so every script and command fits one slot. What it adds over one Redis:

- Its own failures (no node reachable, a slot without a primary) are `RedisClusterException`s, which are not
  `RedisError`s; here they become `ClusterUnavailable`, a redis `ConnectionError`, so that every user of Redis
  in the gateway falls back exactly as it does when one Redis is down.
- It fails fast, as the single-Redis client does (no retry): a node that fails marks the layout stale, and the
  next command asks the cluster for it again (`CLUSTER SLOTS`), so after a failover the promoted replica is
  found by the command after the one that failed.
- A cluster missing a shard keeps serving the others' slots (`require_full_coverage=False`).
- A connection that redis-py closes while another command still writes on it (it recycles a failed node's
  connections) surfaces as an AttributeError from inside redis-py; it is a lost connection, and counts as one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, ClusterPubSub, RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from gateway.cluster_url import TLS_OPTIONS, parse_cluster_url

RedisClient: TypeAlias = "redis.Redis | GatewayCluster"


class ClusterUnavailable(RedisConnectionError):
    """The cluster client could not serve a command: no node answered, or no primary serves the slot."""


# What redis-py's cluster client raises that is not a RedisError (see the module's docstring).
_CLIENT_FAILURES = (RedisClusterException, AttributeError)


class GatewayPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except _CLIENT_FAILURES as error:
            raise ClusterUnavailable(str(error)) from error


class GatewayCluster(RedisCluster):
    """A `RedisCluster` whose failures are redis `ConnectionError`s (see the module's docstring)."""

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as error:
            raise ClusterUnavailable(str(error)) from error

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except _CLIENT_FAILURES as error:
            raise ClusterUnavailable(str(error)) from error

    def get_node_from_key(self, key: Any, replica: bool = False) -> ClusterNode | None:
        try:
            return super().get_node_from_key(key, replica)
        except RedisClusterException as error:
            raise ClusterUnavailable(str(error)) from error

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if transaction or shard_hint:
            raise ValueError("the gateway's cluster pipelines are never transactions")
        return GatewayPipeline(self, transaction)

    async def aclose(self) -> None:
        """Close every node's connections. redis-py's own `aclose` does nothing while the layout is marked to
        be read again (as it is after any node failed), which would leave them open."""
        await super().aclose()
        await self.nodes_manager.aclose()
        await self.nodes_manager.aclose("startup_nodes")

    async def refresh_layout(self) -> None:
        """Ask the cluster for its nodes and slots again (after a node was lost, before choosing another)."""
        try:
            await self.nodes_manager.initialize()
        except RedisClusterException as error:
            raise ClusterUnavailable(str(error)) from error

    def address(self) -> str:
        nodes = self.get_nodes() or list(self.nodes_manager.startup_nodes.values())
        return "cluster via " + ",".join(node.name for node in nodes)

    def subscriber(self, channel: str, *, lost: str | None = None) -> ClusterPubSub:
        """A subscriber on one node: the primary of `channel`'s slot at first, then, after the subscription on
        node `lost` ended, the next node in name order. A classic PUBLISH reaches every node of a cluster,
        replicas too, so any node hears every change. The layout must be known (`refresh_layout`)."""
        nodes = sorted(self.get_nodes(), key=lambda node: node.name)
        if not nodes:
            raise ClusterUnavailable("no cluster node is known")
        names = [node.name for node in nodes]
        if lost is None:
            node = self.get_node_from_key(channel) or nodes[0]
        else:
            after = names.index(lost) + 1 if lost in names else 0
            node = next((item for item in nodes[after:] + nodes[:after] if item.name != lost), nodes[0])
        try:
            return self.pubsub(node=node)
        except RedisClusterException as error:
            raise ClusterUnavailable(str(error)) from error

    @asynccontextmanager
    async def primary_connection(self, key: str) -> AsyncIterator[redis.Redis]:
        """A client on one connection to the primary that serves `key`'s slot now, for writes that WAIT must
        cover (it counts only its own connection's writes). A write there answered MOVED means the layout
        changed under it: the caller fails, and the layout is read again before the next try."""
        node = self.get_node_from_key(key)
        if node is None:
            raise ClusterUnavailable("no primary serves the slot")
        options = {name: value for name, value in self.connection_kwargs.items() if name in _SINGLE_NODE_OPTIONS}
        if self.connection_kwargs.get("connection_class") is SSLConnection:
            options["ssl"] = True
        connection = redis.Redis(
            host=node.host, port=int(node.port), single_connection_client=True, retry=Retry(NoBackoff(), 0), **options
        )
        try:
            yield connection
        finally:
            await connection.aclose()


_SINGLE_NODE_OPTIONS = frozenset(
    {"username", "password", "socket_timeout", "socket_connect_timeout", *TLS_OPTIONS}
)


def connect_cluster(url: str, *, timeout: float) -> GatewayCluster:
    """A cluster client; it connects on first use, so a cluster down at start-up is an outage, not an error."""
    target = parse_cluster_url(url)
    tls: dict[str, Any] = {"ssl": True} if target.tls else {}
    for name, value in target.tls_options:
        tls[name] = value.lower() in {"1", "true", "yes"} if name == "ssl_check_hostname" else value
    return GatewayCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        require_full_coverage=False,
        health_check_interval=5,
        **tls,
    )
