"""Redis as the cache shared by every process: token entries, the change channel, and usage.

Entries are `<version>|<record JSON>` (argon2 hashes, never a secret) or `<version>|deleted`. Every write goes
through one Lua script that refuses to replace a newer version, so a cache fill that read the store before a
change can never overwrite what the change wrote. A deleted token leaves a tombstone whose version beats any
fill. Redis is a cache: when it does not answer, callers fall back to the store.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.cluster_url import is_cluster_url
from gateway.outage import OutageLog
from gateway.ratelimits.shared import lasting_keys
from gateway.redis_cluster import GatewayCluster, RedisClient, connect_cluster
from gateway.request_counts import (
    DAY,
    RECENT_ADDRESSES,
    AddressUses,
    Counts,
    Granularity,
    Outcome,
    PreviousUses,
    parse_outcome,
)
from gateway.sentinel_url import SENTINEL_SCHEME, parse_sentinel_url
from gateway.store.base import TokenStore
from gateway.tokens import TokenRecord, record_from_json, record_to_json

log = logging.getLogger(__name__)

TOMBSTONE_VERSION = 2**62  # beats any real version: ids are never reused
TOMBSTONE_TTL_SECONDS = 24 * 3600
PREVIOUS_USE_TTL_SECONDS = 8 * 24 * 3600

# KEYS[1] = entry; ARGV = version, payload, ttl seconds. Writes only over an older version (or nothing).
_SET_IF_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  local stored = tonumber(string.match(current, '^(%d+)|'))
  if stored and stored >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'EX', tonumber(ARGV[3]))
return 1
"""

# KEYS[1] = usage hash; ARGV = token id, "<unix time>|<ip>", ... Keeps the latest use per token.
_MERGE_USAGE = """
for i = 1, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if (not current) or tonumber(string.match(current, '^([^|]+)|')) < tonumber(string.match(ARGV[i + 1], '^([^|]+)|')) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""

# KEYS[1] = a previous secret's uses; ARGV = count, "<unix time>|<ip>", ttl seconds. Adds the count, keeps the
# latest use.
_MERGE_PREVIOUS_USE = """
redis.call('HINCRBY', KEYS[1], 'uses', ARGV[1])
local current = redis.call('HGET', KEYS[1], 'last')
if (not current) or tonumber(string.match(current, '^([^|]+)|')) < tonumber(string.match(ARGV[2], '^([^|]+)|')) then
  redis.call('HSET', KEYS[1], 'last', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

# KEYS[1] = a token's recent addresses; ARGV[1] = how many to keep, ARGV[2] = ttl seconds, then address, count,
# unix time, ... Fields are "<count>|<last unix time>"; the least recently used beyond the number kept go.
_MERGE_ADDRESSES = """
for i = 3, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  local count, last = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if current then
    local seen, at = string.match(current, '^(%d+)|(.+)$')
    count = count + tonumber(seen)
    if tonumber(at) > last then last = tonumber(at) end
  end
  redis.call('HSET', KEYS[1], ARGV[i], count .. '|' .. string.format('%.6f', last))
end
local all = redis.call('HGETALL', KEYS[1])
local keep = tonumber(ARGV[1])
if #all / 2 > keep then
  local entries = {}
  for i = 1, #all, 2 do
    table.insert(entries, {all[i], tonumber(string.match(all[i + 1], '|(.+)$'))})
  end
  table.sort(entries, function(a, b) return a[2] > b[2] end)
  for i = keep + 1, #entries do redis.call('HDEL', KEYS[1], entries[i][1]) end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# KEYS[1] = usage hash: read and clear it atomically.
_TAKE_USAGE = """
local all = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return all
"""


def connect(url: str, *, timeout: float = 0.5) -> RedisClient:
    """A client that fails fast instead of retrying: a slow Redis must not hold requests up. With a Sentinel
    URL, a client of the service's current primary: each new connection asks the sentinels where it is, so
    after a failover the next attempt reaches the promoted replica. With a cluster URL, a cluster client
    (redis_cluster.py)."""
    if is_cluster_url(url):
        return connect_cluster(url, timeout=timeout)
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 5,
    }
    if urlsplit(url).scheme.lower() != SENTINEL_SCHEME:
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    asking = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 0)}
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=asking)  # type: ignore[no-untyped-call]
    primary: redis.Redis = sentinel.master_for(
        target.service, db=target.db, username=target.username, password=target.password, **options
    )
    return primary


async def disconnect(client: RedisClient) -> None:
    """Close the client and, with Sentinel, its connections to the sentinels."""
    await client.aclose()
    if isinstance(client, redis.Redis) and isinstance(client.connection_pool, SentinelConnectionPool):
        await client.connection_pool.sentinel_manager.aclose()


def redis_address(client: RedisClient) -> str:
    """Where the client connects (host:port, the socket path, the Sentinel service, or the cluster's nodes),
    never its password."""
    if isinstance(client, GatewayCluster):
        return client.address()
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        where = (sentinel.connection_pool.connection_kwargs for sentinel in pool.sentinel_manager.sentinels)
        hosts = ",".join(f"{options['host']}:{options['port']}" for options in where)
        return f"service {pool.service_name!r} via sentinel {hosts}"
    options = pool.connection_kwargs
    if "path" in options:
        return str(options["path"])
    return f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"


class NotReplicated(RedisError):
    """The primary took a change, but no replica confirmed it: a failover now could lose it."""


class RedisKeys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.changes_channel = f"{prefix}token-changes"
        self.usage = f"{prefix}usage"

    def token(self, token_id: str) -> str:
        return f"{self.prefix}token:{token_id}"

    def addresses(self, token_id: str) -> str:
        return f"{self.prefix}usage:addresses:{token_id}"

    def previous_use(self, token_id: str, rotated_at: datetime) -> str:
        """One rotation's previous secret: a new rotation starts a new hash."""
        return f"{self.prefix}usage:previous:{token_id}:{round(rotated_at.timestamp() * 1_000_000)}"

    def counts(self, token_id: str, granularity: Granularity, bucket: int) -> str:
        """The hash holding a bucket's counts: an hour's in its UTC day's hash (`...:2026-12-02`, fields
        `13:allowed`), a day's in its UTC month's (`...:2026-12`, fields `02:allowed`)."""
        moment = datetime.fromtimestamp(bucket, UTC)
        period = moment.strftime("%Y-%m-%d" if granularity is Granularity.HOUR else "%Y-%m")
        return f"{self.prefix}usage:{granularity.value}:{token_id}:{period}"


class RedisTokens:
    """Shared token entries in Redis, in front of the store. Fails over to the store, never open."""

    def __init__(
        self,
        client: RedisClient,
        store: TokenStore,
        *,
        key_prefix: str = "gateway:",
        entry_ttl: float = 300.0,
        retry_after: float = 1.0,
        confirm_timeout: float = 0.3,
    ) -> None:
        """With Sentinel or a cluster, a delivered change counts only once a replica confirms it (see
        `confirm`): else a failover could promote a replica that still holds the token as it was before, for
        `entry_ttl`."""
        self.client = client
        replicated = isinstance(client, GatewayCluster) or isinstance(client.connection_pool, SentinelConnectionPool)
        self._confirm_replicas = 1 if replicated else 0
        self._confirm_timeout_ms = max(1, int(confirm_timeout * 1000))
        self.keys = RedisKeys(key_prefix)
        self._store = store
        self._entry_ttl = max(1, int(entry_ttl))
        self._retry_after = retry_after
        self._set_if_newer = client.register_script(_SET_IF_NEWER)
        self._skip_redis_until = 0.0
        # Shared by every user of this Redis in the process (change delivery, usage): one outage, two lines.
        self.outage = OutageLog(log, f"redis at {redis_address(client)}")
        self.redis_reads = 0
        self.redis_hits = 0  # reads Redis answered with an entry (or a tombstone)
        self.redis_errors = 0  # reads that failed or were skipped while Redis is distrusted
        self.store_found = 0  # store reads on a Redis miss that found the token
        self.store_missing = 0
        self.fills = 0

    @property
    def reads(self) -> int:
        return self._store.reads

    def distrust_for(self, seconds: float) -> None:
        """Read the store directly for a while (after a reconnect, Redis may hold what a lost change missed)."""
        self._skip_redis_until = max(self._skip_redis_until, time.monotonic() + seconds)

    def _redis_failed(self, what: str, error: Exception) -> None:
        self.outage.failed(error, f"token {what}s use the store (Redis is tried again every {self._retry_after:g}s)")
        self._skip_redis_until = time.monotonic() + self._retry_after

    async def get_token(self, token_id: str) -> TokenRecord | None:
        """The token from Redis, else from the store (then written to Redis unless a newer entry is there)."""
        use_redis = time.monotonic() >= self._skip_redis_until
        if use_redis:
            try:
                raw = cast("bytes | None", await self.client.get(self.keys.token(token_id)))
                self.redis_reads += 1
                if self.outage.down:
                    self.outage.recovered()
            except (RedisError, OSError) as error:
                self._redis_failed("read", error)
                use_redis = False
                self.redis_errors += 1
            else:
                if raw is not None:
                    self.redis_hits += 1
                    _, _, payload = raw.partition(b"|")
                    return None if payload == b"deleted" else record_from_json(json.loads(payload))
        else:
            self.redis_errors += 1
        record = await self._store.get_token(token_id)
        if record is None:
            self.store_missing += 1
        else:
            self.store_found += 1
        if use_redis and record is not None:
            try:
                await self.write(record)
                self.fills += 1
            except (RedisError, OSError) as error:
                self._redis_failed("fill", error)
        return record

    async def write(self, record: TokenRecord, *, via: redis.Redis | None = None) -> bool:
        payload = json.dumps(record_to_json(record), separators=(",", ":"))
        result = await self._set_if_newer(
            keys=[self.keys.token(record.id)], args=[record.version, payload, self._entry_ttl], client=via
        )
        return bool(result)

    async def write_tombstone(self, token_id: str, *, via: redis.Redis | None = None) -> None:
        """The token is deleted: its entry becomes a tombstone, and its limit counts go."""
        await self._set_if_newer(
            keys=[self.keys.token(token_id)],
            args=[TOMBSTONE_VERSION, "deleted", TOMBSTONE_TTL_SECONDS],
            client=via,
        )
        # Not `via`: on a cluster the limit keys (hash-tagged by the token id) may live on another primary
        # than the entry; their deletion needs no replica's confirmation.
        await self.client.delete(*lasting_keys(self.keys.prefix, token_id))

    async def publish(
        self, changes: Iterable[tuple[str, float | None]], *, via: redis.Redis | None = None
    ) -> None:
        """Announce changed tokens: `<id> <commit unix time>`, or `<id>` alone when the time is unknown (a
        delete). Listeners take the id from before the space and measure the propagation lag from the time."""
        for token_id, committed_at in changes:
            message = token_id if committed_at is None else f"{token_id} {committed_at:.6f}"
            await (via or self.client).publish(self.keys.changes_channel, message)

    async def deliver(self, entries: Sequence[tuple[str, TokenRecord | None]]) -> None:
        """Write each token's entry (a tombstone for None), announce them all, then confirm the writes
        (`confirm`). Announced before confirmed: every proxy hears of a change at once, even while no
        replica confirms it and the outbox keeps it."""
        announced = [(token_id, None if record is None else record.updated_at.timestamp()) for token_id, record in entries]
        if isinstance(self.client, GatewayCluster):
            await self._deliver_to_cluster(self.client, entries, announced)
            return
        async with self.one_connection() as connection:
            for token_id, record in entries:
                await self._write_entry(token_id, record, via=connection)
            await self.publish(announced, via=connection)
            await self.confirm(connection)

    async def _deliver_to_cluster(
        self,
        cluster: GatewayCluster,
        entries: Sequence[tuple[str, TokenRecord | None]],
        announced: Sequence[tuple[str, float | None]],
    ) -> None:
        """Each entry on one connection to its slot's primary (WAIT there covers it), the announcement
        through any node: a cluster passes a classic PUBLISH to every node. A failure may mean the layout
        changed (a failover): it is read again, and the outbox tries again with it."""
        try:
            await cluster.initialize()
            by_primary: dict[str, list[tuple[str, TokenRecord | None]]] = {}
            for token_id, record in entries:
                node = cluster.get_node_from_key(self.keys.token(token_id))
                by_primary.setdefault("" if node is None else node.name, []).append((token_id, record))
            async with AsyncExitStack() as stack:
                connections = []
                for group in by_primary.values():
                    connection = await stack.enter_async_context(
                        cluster.primary_connection(self.keys.token(group[0][0]))
                    )
                    connections.append(connection)
                    for token_id, record in group:
                        await self._write_entry(token_id, record, via=connection)
                await self.publish(announced)
                for connection in connections:
                    await self.confirm(connection)
        except (RedisError, OSError):
            try:
                await cluster.refresh_layout()
            except (RedisError, OSError):
                pass
            raise

    async def _write_entry(self, token_id: str, record: TokenRecord | None, *, via: redis.Redis) -> None:
        if record is None:
            await self.write_tombstone(token_id, via=via)
        else:
            await self.write(record, via=via)

    @asynccontextmanager
    async def one_connection(self) -> AsyncIterator[redis.Redis]:
        """A client on one connection, for a delivery that `confirm` covers: WAIT counts only the writes its
        own connection sent."""
        assert isinstance(self.client, redis.Redis)
        connection = self.client.client()
        try:
            yield connection
        finally:
            await connection.aclose()

    async def confirm(self, via: redis.Redis) -> None:
        """With Sentinel, wait until a replica holds what `via` wrote; raises NotReplicated when none does in
        time, so that the outbox keeps the change and delivers it again (to the promoted one, after a
        failover). A primary with no replica attached (its replica was just promoted from it, or is down) has
        none to lose it to: a replica that attaches later copies everything."""
        if not self._confirm_replicas:
            return
        if int(await via.wait(self._confirm_replicas, self._confirm_timeout_ms)) >= self._confirm_replicas:
            return
        role = await via.role()
        if len(role) > 2 and role[2]:
            raise NotReplicated(f"no replica confirmed the change within {self._confirm_timeout_ms} ms")



class RedisUsage:
    """Usage shared across replicas: each proxy merges its batch into one hash; the admin process drains it."""

    def __init__(self, client: RedisClient, *, key_prefix: str = "gateway:") -> None:
        self._client = client
        self._keys = RedisKeys(key_prefix)
        self._key = self._keys.usage
        self._merge = client.register_script(_MERGE_USAGE)
        self._take = client.register_script(_TAKE_USAGE)
        self._merge_previous = client.register_script(_MERGE_PREVIOUS_USE)
        self._merge_addresses = client.register_script(_MERGE_ADDRESSES)

    async def record_usage(self, usage: Mapping[str, tuple[datetime, str]]) -> None:
        args: list[str] = []
        for token_id, (at, ip) in usage.items():
            args += [token_id, f"{at.timestamp():.6f}|{ip}"]
        if args:
            await self._merge(keys=[self._key], args=args)

    async def record_counts(self, counts: Counts, *, now: float) -> None:
        """HINCRBY each count into its period's hash, in one pipeline; each hash expires once its last bucket
        is older than it is kept (8 days after its day ends, 91 after its month ends)."""
        if not counts:
            return
        expiry: dict[str, int] = {}
        async with self._client.pipeline(transaction=False) as pipe:
            for (token_id, granularity, bucket, outcome), count in counts.items():
                key = self._keys.counts(token_id, granularity, bucket)
                pipe.hincrby(key, _count_field(granularity, bucket, outcome), count)
                expiry[key] = max(expiry.get(key, 0), _period_end(granularity, bucket) + granularity.kept)
            for key, until in expiry.items():
                pipe.expire(key, max(60, int(until - now)))
            await pipe.execute()

    async def read_counts(self, token_id: str, granularity: Granularity, since: int) -> dict[tuple[int, Outcome], int]:
        keys = sorted({self._keys.counts(token_id, granularity, bucket) for bucket in _buckets(granularity, since)})
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            hashes = await pipe.execute()
        counts: dict[tuple[int, Outcome], int] = {}
        for key, fields in zip(keys, hashes, strict=True):
            period = key.rsplit(":", 1)[1]
            for field, value in fields.items():
                parsed = _parse_count_field(granularity, period, field.decode())
                if parsed is not None and parsed[0] >= since:
                    counts[parsed] = counts.get(parsed, 0) + int(value)
        return counts

    async def requests_since(self, token_ids: Sequence[str], since: int) -> dict[str, int]:
        buckets = range(since, since + DAY, Granularity.HOUR.seconds)
        asked: list[tuple[str, str]] = []
        async with self._client.pipeline(transaction=False) as pipe:
            for token_id in token_ids:
                for key in sorted({self._keys.counts(token_id, Granularity.HOUR, b) for b in buckets}):
                    asked.append((token_id, key))
                    pipe.hgetall(key)
            hashes = await pipe.execute()
        totals = dict.fromkeys(token_ids, 0)
        for (token_id, key), fields in zip(asked, hashes, strict=True):
            period = key.rsplit(":", 1)[1]
            for field, value in fields.items():
                parsed = _parse_count_field(Granularity.HOUR, period, field.decode())
                if parsed is not None and parsed[0] >= since:
                    totals[token_id] += int(value)
        return totals

    async def record_previous_uses(self, uses: PreviousUses) -> None:
        """Kept 8 days: longer than the longest grace (7 days), so the hash outlives what it describes."""
        for (token_id, rotated_at), (count, at, ip) in uses.items():
            await self._merge_previous(
                keys=[self._keys.previous_use(token_id, rotated_at)],
                args=[count, f"{at.timestamp():.6f}|{ip}", PREVIOUS_USE_TTL_SECONDS],
            )

    async def previous_secret_use(self, token_id: str, rotated_at: datetime) -> tuple[int, datetime, str] | None:
        key = self._keys.previous_use(token_id, rotated_at)
        fields = cast("dict[bytes, bytes]", await self._client.hgetall(key))
        if not fields or b"last" not in fields:
            return None
        at, _, ip = fields[b"last"].decode().partition("|")
        return int(fields.get(b"uses", b"0")), datetime.fromtimestamp(float(at), UTC), ip

    async def record_addresses(self, uses: AddressUses) -> None:
        """One script per token: its hash holds at most RECENT_ADDRESSES fields, and expires 91 days after its
        last write, like the day counts."""
        by_token: dict[str, list[str | int]] = {}
        for (token_id, address), (count, at) in uses.items():
            by_token.setdefault(token_id, []).extend([address, count, f"{at.timestamp():.6f}"])
        for token_id, args in by_token.items():
            await self._merge_addresses(
                keys=[self._keys.addresses(token_id)], args=[RECENT_ADDRESSES, Granularity.DAY.kept, *args]
            )

    async def recent_addresses(self, token_id: str) -> list[tuple[str, int, datetime]]:
        fields = cast("dict[bytes, bytes]", await self._client.hgetall(self._keys.addresses(token_id)))
        found = []
        for address, value in fields.items():
            count, _, at = value.decode().partition("|")
            found.append((address.decode(), int(count), datetime.fromtimestamp(float(at), UTC)))
        return sorted(found, key=lambda item: item[2], reverse=True)[:RECENT_ADDRESSES]

    async def take(self) -> dict[str, tuple[datetime, str]]:
        flat = await self._take(keys=[self._key])
        usage: dict[str, tuple[datetime, str]] = {}
        for token_id, value in zip(flat[::2], flat[1::2], strict=True):
            at, _, ip = value.decode().partition("|")
            usage[token_id.decode()] = (datetime.fromtimestamp(float(at), UTC), ip)
        return usage


def _count_field(granularity: Granularity, bucket: int, outcome: Outcome) -> str:
    moment = datetime.fromtimestamp(bucket, UTC)
    return f"{moment.hour if granularity is Granularity.HOUR else moment.day:02d}:{outcome.value}"


def _parse_count_field(granularity: Granularity, period: str, field: str) -> tuple[int, Outcome] | None:
    number, _, name = field.partition(":")
    outcome = parse_outcome(name)
    if outcome is None or not number.isdigit():
        return None
    if granularity is Granularity.HOUR:
        start = datetime.strptime(period, "%Y-%m-%d").replace(tzinfo=UTC, hour=int(number))
    else:
        start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC, day=int(number))
    return int(start.timestamp()), outcome


def _period_end(granularity: Granularity, bucket: int) -> int:
    """When the hash holding this bucket stops receiving counts: the end of its day, or of its month."""
    if granularity is Granularity.HOUR:
        return bucket - bucket % DAY + DAY
    moment = datetime.fromtimestamp(bucket, UTC)
    next_month = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return int(next_month.timestamp())


def _buckets(granularity: Granularity, since: int) -> range:
    """Every bucket start from `since` to the end of the window shown (its keys are read)."""
    return range(since, since + granularity.shown * granularity.seconds, granularity.seconds)
