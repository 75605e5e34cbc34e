"""Limits shared by every replica: one Lua script per request, run by Redis atomically (one EVALSHA, sent
on the connection of pipe.py, or on a Redis Cluster on the pipe to the keys' primary (cluster_pipes.py);
through redis-py for a TLS URL).

The script reads the token's quota counter and its GCRA arrival time (gcra.py explains GCRA), decides, and
writes both only when the request is allowed. Redis runs a script alone, so two replicas can never both
spend the last request of a budget; there is no read-then-write race and no per-replica share to tune
(Kong's "sync_rate", APISIX's count times the number of instances).

Keys, both with the token id as a cluster hash tag so that they live on one shard:
    <prefix>limit:{<token id>}:rate            the TAT, with an expiry when it is reached (an idle token costs
                                                no memory)
    <prefix>limit:{<token id>}:quota:<period>  the requests counted in one period (d20271231, m202712, total),
                                                expiring a minute after the period's end (UTC); a total quota's never does

Time is the gateway's clock (injectable, so tests cross a UTC midnight without waiting), not Redis's: the
replicas' clocks must agree (NTP); a skew of d seconds between two replicas lends at most d seconds of rate.

When Redis does not answer, the check falls back to the process's own LocalLimiter (each replica then
counts alone), Redis is retried after `retry_interval` seconds, and `degraded` says so (/readyz, /metrics).
"""

from __future__ import annotations

import logging
import time

from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

from gateway.outage import OutageLog
from gateway.ratelimits.cluster_pipes import ClusterPipes
from gateway.ratelimits.gcra import EPOCH, QUOTA_EXCEEDED, RATE_LIMITED, LimitOutcome, LocalLimiter
from gateway.ratelimits.pipe import ReplyError, ScriptPipe
from gateway.ratelimits.policy import Quota, RateLimit
from gateway.redis_cluster import GatewayCluster, RedisClient

log = logging.getLogger(__name__)

# KEYS[1] = the TAT, KEYS[2] = the period's counter.
# ARGV[1] = now (seconds since EPOCH), ARGV[2] = emission interval (0: no rate), ARGV[3] = tolerance,
# ARGV[4] = quota (0: none), ARGV[5] = the counter's expiry (Unix seconds, 0: never).
# Returns {refused: 0 | 1 rate | 2 quota, rate requests left, "seconds until the rate is whole",
#          quota used, "seconds to wait"}; fractions as strings (a Lua number in a reply loses them).
CHECK_SCRIPT = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tolerance = tonumber(ARGV[3])
local quota = tonumber(ARGV[4])
local used = 0
if quota > 0 then
  used = tonumber(redis.call('GET', KEYS[2]) or '0')
end
local base = now
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '')
  if tat and tat > now then base = tat end
end
if quota > 0 and used >= quota then
  local unused = 0
  if interval > 0 then
    unused = math.max(0, math.floor((now + tolerance + interval - base) / interval + 1e-9))
  end
  return {2, unused, tostring(base - now), used, '0'}
end
local remaining = 0
local reset = 0
if interval > 0 then
  local allowed_at = base - tolerance
  if now < allowed_at then
    return {1, 0, tostring(base - now), used, tostring(allowed_at - now)}
  end
  local new_tat = base + interval
  remaining = math.max(0, math.floor((now + tolerance - new_tat) / interval + 1e-9) + 1)
  reset = new_tat - now
  redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.ceil(reset * 1000) + 1)
end
if quota > 0 then
  used = redis.call('INCR', KEYS[2])
  local expire = tonumber(ARGV[5])
  if used == 1 and expire > 0 then redis.call('EXPIREAT', KEYS[2], expire) end
end
return {0, remaining, tostring(reset), used, '0'}
"""

_CODES = {1: RATE_LIMITED, 2: QUOTA_EXCEEDED}


def _pipe_for(client: RedisClient) -> ScriptPipe | ClusterPipes | None:
    """The fast connection (pipe.py) to the Redis `client` talks to (on a cluster, one per primary), or None
    for TLS (redis-py then runs the script)."""
    if isinstance(client, GatewayCluster):
        if client.connection_kwargs.get("connection_class", Connection) is not Connection:
            return None
        script = client.register_script(CHECK_SCRIPT)
        timeout = float(client.connection_kwargs.get("socket_timeout") or 0.5)
        return ClusterPipes(
            client, CHECK_SCRIPT, lambda keys, arguments: script(keys=keys, args=arguments), timeout=timeout
        )
    pool = client.connection_pool
    options = pool.connection_kwargs
    if "path" in options:
        address: dict[str, object] = {"path": options["path"]}
    elif pool.connection_class.__name__ == "Connection":
        address = {"host": options.get("host", "localhost"), "port": int(options.get("port", 6379))}
    else:
        return None
    return ScriptPipe(
        CHECK_SCRIPT,
        username=options.get("username"),
        password=options.get("password"),
        db=int(options.get("db") or 0),
        timeout=float(options.get("socket_timeout") or 0.5),
        **address,  # type: ignore[arg-type]
    )


class RedisLimiter:
    def __init__(
        self,
        client: RedisClient,
        fallback: LocalLimiter,
        *,
        key_prefix: str = "gateway:",
        outage: OutageLog | None = None,
        retry_interval: float = 1.0,
    ) -> None:
        self._script = client.register_script(CHECK_SCRIPT)
        self._pipe = _pipe_for(client)
        self._fallback = fallback
        self._prefix = f"{key_prefix}limit:"
        self._outage = outage or OutageLog(log, "redis")
        self._retry_interval = retry_interval
        self._skip_until = 0.0
        self.degraded = False  # the last check fell back to this process's own counts
        self.redis_checks = 0
        self.fallback_checks = 0

    async def close(self) -> None:
        if self._pipe is not None:
            await self._pipe.close()

    async def check(
        self, token_id: str, rate: RateLimit | None, quota: Quota | None, now: float
    ) -> LimitOutcome:
        if time.monotonic() < self._skip_until:
            self.fallback_checks += 1
            return self._fallback.check(token_id, rate, quota, now)
        period, end = ("", None) if quota is None else quota.window(now)[::2]
        keys = (f"{self._prefix}{{{token_id}}}:rate", f"{self._prefix}{{{token_id}}}:quota:{period}")
        interval = 0.0 if rate is None else rate.interval
        tolerance = 0.0 if rate is None else interval * (rate.capacity - 1)
        arguments = (
            repr(now - EPOCH),
            repr(interval),
            repr(tolerance),
            0 if quota is None else quota.requests,
            # A minute past the period's end: the key names its period, so a replica whose clock runs a little
            # behind still counts into the same key rather than into one already expired.
            0 if end is None else int(end) + 60,
        )
        try:
            if self._pipe is not None:
                reply = await self._pipe.run(keys, arguments)
            else:
                reply = await self._script(keys=keys, args=arguments)
            refused, rate_remaining, rate_reset, used, wait = reply
        except (RedisError, OSError, ReplyError) as error:
            self._outage.failed(
                error,
                "rate limits and quotas are counted per process until it answers"
                f" (tried again every {self._retry_interval:g}s)",
            )
            self._skip_until = time.monotonic() + self._retry_interval
            self.degraded = True
            self.fallback_checks += 1
            return self._fallback.check(token_id, rate, quota, now)
        self.redis_checks += 1
        if self.degraded:
            self.degraded = False
            self._outage.recovered()
        quota_remaining = 0 if quota is None else max(0, quota.requests - int(used))
        quota_reset = None if end is None else end - now
        code = _CODES.get(int(refused))
        retry_after: float | None = None
        if code == RATE_LIMITED:
            retry_after = float(wait)
        elif code == QUOTA_EXCEEDED:
            retry_after = quota_reset
        return LimitOutcome(
            code, int(rate_remaining), float(rate_reset), quota_remaining, quota_reset, retry_after
        )
