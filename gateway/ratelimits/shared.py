"""Limits shared by every replica: one Lua script decides each request, run by Redis atomically (one EVALSHA
per event-loop turn, for every request of that turn, on the connection of pipe.py; on a Redis Cluster, one
per turn and hash slot on the pipe to the slot's primary (cluster_pipes.py); one per request through
redis-py for a TLS URL).

The script reads the token's quota counter and its GCRA arrival time (gcra.py explains GCRA), decides, and
writes both only when the request is allowed. Redis runs a script alone, so two replicas can never both
spend the last request of a budget; there is no read-then-write race and no per-replica share to tune
(Kong's "sync_rate", APISIX's count times the number of instances).

Keys, both with the token id as a cluster hash tag so that they live on one shard:
    <prefix>limit:{<token id>}:rate            the TAT, with an expiry when it is reached (an idle token costs
                                                no memory)
    <prefix>limit:{<token id>}:quota:<period>  the requests counted in one period (d20271231, m202712, total),
                                                expiring a minute after the period's end (UTC); a total
                                                quota's never does: it goes when the token is deleted
                                                (`lasting_keys`, for redis_tokens.py)

Time is the gateway's clock (injectable, so tests cross a UTC midnight without waiting), not Redis's: the
replicas' clocks must agree (NTP); a skew of d seconds between two replicas lends at most d seconds of rate.

When Redis does not answer, the check falls back to the process's own LocalLimiter (each replica then
counts alone), Redis is retried after `retry_interval` seconds, and `degraded` says so (/readyz, /metrics).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, NamedTuple, cast

from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

from gateway.outage import OutageLog
from gateway.ratelimits.cluster_pipes import ClusterPipes
from gateway.ratelimits.gcra import (
    EPOCH,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    SLACK_SECONDS,
    SLACK_SHARE,
    LimitOutcome,
    LocalLimiter,
)
from gateway.ratelimits.leases import LEASE_SECONDS, LEASE_SHARE, Lease
from gateway.ratelimits.pipe import ReplyError, ScriptPipe, bulk
from gateway.ratelimits.policy import Quota, RateLimit
from gateway.redis_cluster import GatewayCluster, RedisClient

log = logging.getLogger(__name__)

# One call is two KEYS (the TAT, the period's counter) and three ARGV: now (nanoseconds since EPOCH, an
# integer zero-padded to a fixed width so that the gateway writes it with one format), the token's limits,
# "<emission interval> <tolerance> <quota> <counter's expiry>" (interval 0: no rate; quota 0: none; expiry in
# Unix seconds, 0: never), read once per batch, and `want`: the units a replica would lease besides the
# request (leases.py; 0 for none), or, below 0, a lease's unspent quota units it gives back (no request).
# KEYS and ARGV hold any number of calls one after another (pipe.py sends the calls of one event-loop turn
# together); each is decided in turn, as if alone, and answered with one line of the reply:
#   refused (0, 1 rate, 2 quota),the TAT the request found less now (0: idle),quota used (after it),units leased
# An allowed request leases at most `want` units, and at most 1/LEASE_SHARE of the rate's and of the quota's
# budget left after it: none near a limit. The gateway computes the header fields from these (`_outcome`):
# writing a number costs Lua a sprintf, the largest part of a check's cost in Redis, so the reply holds as
# few as possible and a 0 is written as is. Lua writes 14 significant digits, more than the seconds need.
# A key is read once per batch and written once at its end (the last TAT, the counter raised by the requests
# counted): the same answers as one script per call, with fewer Redis commands when a busy token has several
# requests in one turn.
CHECK_SCRIPT = (
    """
local tats, tat_expiry, counts, counted, count_expiry = {}, {}, {}, {}, {}
local function count_of(quota_key)
  local used = counts[quota_key]
  if used == nil then
    used = tonumber(redis.call('GET', quota_key) or '0')
    counts[quota_key], counted[quota_key] = used, 0
  end
  return used
end
local function give_back(quota_key, quota, units)
  if quota > 0 then
    local used = count_of(quota_key)
    local back = math.min(units, used)
    counts[quota_key], counted[quota_key] = used - back, counted[quota_key] - back
  end
  return '0,0,0,0'
end
local function check(rate_key, quota_key, now, interval, tolerance, quota, expire, want)
  local used = 0
  if quota > 0 then used = count_of(quota_key) end
  local base = now
  if interval > 0 then
    local tat = tats[rate_key]
    if tat == nil then
      tat = tonumber(redis.call('GET', rate_key) or '') or false
      tats[rate_key] = tat
    end
    if tat and tat > now then base = tat end
  end
  local found = base > now and tostring(base - now) or '0'
  if quota > 0 and used >= quota then
    return '2,' .. found .. ',' .. used .. ',0'
  end
  local new_tat = base + interval
  if interval > 0 and now + interval * SLACK_SHARE + SLACK_SECONDS < base - tolerance then
    return '1,' .. found .. ',' .. (quota > 0 and used or '0') .. ',0'
  end
  local extra = 0
  if want > 0 then
    extra = want
    if interval > 0 then
      local free = math.floor((now + tolerance - new_tat) / interval + 1e-9) + 1
      extra = math.min(extra, math.floor(free / LEASE_SHARE))
    end
    if quota > 0 then extra = math.min(extra, math.floor((quota - used - 1) / LEASE_SHARE)) end
    if extra < 0 then extra = 0 end
  end
  if interval > 0 then
    new_tat = new_tat + extra * interval
    tats[rate_key], tat_expiry[rate_key] = new_tat, math.ceil((new_tat - now) * 1000) + 1
  end
  local leased = extra > 0 and tostring(extra) or '0'
  if quota > 0 then
    used = used + 1 + extra
    counts[quota_key], counted[quota_key], count_expiry[quota_key] = used, counted[quota_key] + 1 + extra, expire
    return '0,' .. found .. ',' .. used .. ',' .. leased
  end
  return '0,' .. found .. ',0,' .. leased
end
local lines, limits = {}, {}
for call = 1, #KEYS / 2 do
  local text = ARGV[3 * call - 1]
  local limit = limits[text]
  if limit == nil then
    local interval, tolerance, quota, expire = string.match(text, '^(%S+) (%S+) (%S+) (%S+)$')
    limit = {tonumber(interval), tonumber(tolerance), tonumber(quota), tonumber(expire)}
    limits[text] = limit
  end
  local want = ARGV[3 * call]
  want = want == '0' and 0 or tonumber(want)
  if want < 0 then
    lines[call] = give_back(KEYS[2 * call], limit[3], -want)
  else
    lines[call] = check(KEYS[2 * call - 1], KEYS[2 * call], tonumber(ARGV[3 * call - 2]) / 1e9,
                        limit[1], limit[2], limit[3], limit[4], want)
  end
end
for key, expiry in pairs(tat_expiry) do
  redis.call('SET', key, string.format('%.17g', tats[key]), 'PX', expiry)
end
for key, added in pairs(counted) do
  if added ~= 0 then
    local used = redis.call('INCRBY', key, added)
    if used == added and count_expiry[key] > 0 then redis.call('EXPIREAT', key, count_expiry[key]) end
  end
end
return table.concat(lines, '\\n')
""".replace("LEASE_SHARE", str(LEASE_SHARE))
    .replace("SLACK_SHARE", repr(SLACK_SHARE))
    .replace("SLACK_SECONDS", repr(SLACK_SECONDS))
)

# LimitOutcome(...) runs a Python-level __new__: an allowed request (most are) makes the tuple directly.
_new_outcome = cast(Callable[[tuple[Any, ...]], LimitOutcome], partial(tuple.__new__, LimitOutcome))
# now - EPOCH in nanoseconds, at a fixed width so that its RESP length is known before it is written (wide
# enough for any clock from 1710 to 5000). An integer: a float's decimals cost twice as much to write.
_NOW_WIDTH = 20
_NOW = b"%020d"


class _Call(NamedTuple):
    """A token's call of the script but for `now`, kept while its limits and quota period stay the same."""

    rate: RateLimit | None
    quota: Quota | None
    period: str
    interval: float  # 0.0 without a rate
    tolerance: float
    keys: tuple[str, str]
    limits: str  # the script's second argument
    encoded_keys: bytes
    arguments: bytes  # the first two arguments, a format of the nanoseconds since EPOCH


def limit_key(key_prefix: str, token_id: str, name: str) -> str:
    """`name`: "rate", or "quota:<period>"."""
    return f"{key_prefix}limit:{{{token_id}}}:{name}"


def lasting_keys(key_prefix: str, token_id: str) -> tuple[str, ...]:
    """A token's keys that would outlive it: its total quota's count never expires (and its TAT only once
    the budget is whole). Deleted with the token."""
    return limit_key(key_prefix, token_id, "rate"), limit_key(key_prefix, token_id, "quota:total")


def _pipe_for(client: RedisClient) -> ScriptPipe | ClusterPipes | None:
    """The fast connection (pipe.py) to the Redis `client` talks to (on a cluster, one per primary), or None
    for TLS (redis-py then runs the script)."""
    if isinstance(client, GatewayCluster):
        if client.connection_kwargs.get("connection_class", Connection) is not Connection:
            return None
        script = client.register_script(CHECK_SCRIPT)
        return ClusterPipes(
            client,
            CHECK_SCRIPT,
            lambda keys, arguments: script(keys=keys, args=arguments),
            keys_per_call=2,
            arguments_per_call=3,
            timeout=float(client.connection_kwargs.get("socket_timeout") or 0.5),
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
        keys_per_call=2,
        arguments_per_call=3,
        username=options.get("username"),
        password=options.get("password"),
        db=int(options.get("db") or 0),
        timeout=float(options.get("socket_timeout") or 0.5),
        **address,  # type: ignore[arg-type]
    )


_NO_LEASE = bulk(b"0")  # `want` when a check asks for no lease


class RedisLimiter:
    """`leases`: let a busy token far below its limits take shares of its budget (leases.py); off, every
    check is one call of the script."""

    def __init__(
        self,
        client: RedisClient,
        fallback: LocalLimiter,
        *,
        key_prefix: str = "gateway:",
        outage: OutageLog | None = None,
        retry_interval: float = 1.0,
        max_entries: int = 100_000,
        leases: bool = False,
    ) -> None:
        self._script = client.register_script(CHECK_SCRIPT)
        pipe = _pipe_for(client)
        self._pipe = pipe if isinstance(pipe, ScriptPipe) else None
        self._cluster_pipes = pipe if isinstance(pipe, ClusterPipes) else None
        self._fallback = fallback
        self._prefix = key_prefix
        self._outage = outage or OutageLog(log, "redis")
        self._retry_interval = retry_interval
        self._skip_until = 0.0
        self._calls: dict[str, _Call] = {}  # token id -> its call of the script, but for `now`
        self._leases: dict[str, Lease] | None = {} if leases else None  # token id -> its lease here
        self._giving_back: set[asyncio.Future[bytes]] = set()
        self._closed = False
        self._max_entries = max_entries
        self.degraded = False  # the last check fell back to this process's own counts
        self.redis_checks = 0
        self.fallback_checks = 0
        self.leased_checks = 0  # requests served from a lease, without a call of the script

    async def close(self) -> None:
        """Gives back the quota units of every lease (a rolling restart does not lose them), then closes.
        A lease granted to a check still in flight then is lost (at most 1/16 of what was free)."""
        if self._leases:
            for lease in list(self._leases.values()):
                self._give_back(lease)
            self._leases.clear()
        if self._giving_back:
            await asyncio.wait(self._giving_back, timeout=1.0)
        self._closed = True  # a lease's end after this gives nothing back: the connection is gone
        if self._pipe is not None:
            await self._pipe.close()
        if self._cluster_pipes is not None:
            await self._cluster_pipes.close()

    async def check(
        self,
        token_id: str,
        rate: RateLimit | None,
        quota: Quota | None,
        now: float,
        window: tuple[str, float | None] = ("", None),
    ) -> LimitOutcome:
        """`window`: the quota's period now (its name and end, as `Quota.window` gives them), ("", None)
        without a quota."""
        from_lease = self.spend_lease(token_id, rate, quota, now, window)
        if from_lease is not None:
            return from_lease
        period, end = window
        call = self._calls.get(token_id)
        if call is None or call.rate is not rate or call.quota is not quota or call.period != period:
            call = self._call(token_id, rate, quota, period, end)
        leases = self._leases
        lease = None if leases is None else leases.get(token_id)
        if self._skip_until and time.monotonic() < self._skip_until:
            self.fallback_checks += 1
            return self._fallback.check(token_id, rate, quota, now)
        want, asker = 0, None
        if lease is not None and lease.call is not call:
            self._give_back(lease)  # the token's limits or its quota period changed
            lease = None
        if leases is not None and lease is None:
            if len(leases) >= self._max_entries:
                self._give_back(leases.pop(next(iter(leases))))  # the oldest
            lease = leases[token_id] = Lease(call, now)
        if lease is not None:
            lease.served += 1
            if not lease.asking:  # this check may take a lease; the others meanwhile ask for none
                asker, lease.asking = lease, True
                self._give_back(lease)  # what an expired lease left
                want = lease.want(now)
        try:
            if want:
                line = await self._asking(call, (now - EPOCH) * 1e9, want)
            else:
                line = await self._run(call, (now - EPOCH) * 1e9, 0)
            refused, found_text, used_text, leased = line.split(b",")
            found, used, units = float(found_text), int(used_text), int(leased)
        except (RedisError, OSError, ReplyError, ValueError) as error:
            self._outage.failed(
                error,
                "rate limits and quotas are counted per process until it answers"
                f" (tried again every {self._retry_interval:g}s)",
            )
            self._skip_until = time.monotonic() + self._retry_interval
            self.degraded = True
            self.fallback_checks += 1
            return self._fallback.check(token_id, rate, quota, now)
        finally:
            if asker is not None:
                asker.asking = False
        self.redis_checks += 1
        if self.degraded:
            self.degraded = False
            self._skip_until = 0.0
            self._outage.recovered()
        if refused == b"0":
            if units and asker is not None:
                used -= units  # this request's own answer, as if it had leased nothing
                asker.grant(units, found + (units + 1) * call.interval, used + units, now, now - EPOCH)
                if call.quota is not None:
                    asyncio.get_running_loop().call_later(LEASE_SECONDS, self._lapse, asker, asker.expires)
            return self._allowed(call, quota, now, end, found, used)
        # The header fields, as gcra.py computes them, from the TAT found (how far ahead of now).
        left = 0 if quota is None else max(0, quota.requests - used)
        quota_reset = None if end is None else end - now
        interval, tolerance = call.interval, call.tolerance
        if refused == b"1":
            return LimitOutcome(RATE_LIMITED, 0, found, left, quota_reset, found - tolerance)
        unused = 0
        if interval:
            unused = max(0, math.floor((tolerance + interval - found) / interval + 1e-9))
        return LimitOutcome(QUOTA_EXCEEDED, unused, found, left, quota_reset, quota_reset)

    def spend_lease(
        self,
        token_id: str,
        rate: RateLimit | None,
        quota: Quota | None,
        now: float,
        window: tuple[str, float | None] = ("", None),
    ) -> LimitOutcome | None:
        """The request served from the lease this process holds for the token and these limits, without a
        call of the script and without an await (the proxy tries it before `check`); None when there is no
        such lease, or it is spent or over."""
        leases = self._leases
        if leases is None:
            return None
        lease = leases.get(token_id)
        if lease is None or not lease.units or now >= lease.expires:
            return None
        call = lease.call
        if call.rate is not rate or call.quota is not quota or call.period != window[0]:
            return None
        self.leased_checks += 1
        found, used = lease.spend(now - EPOCH, call.interval)
        return self._allowed(call, quota, now, window[1], found, used)

    @staticmethod
    def _allowed(
        call: _Call, quota: Quota | None, now: float, end: float | None, found: float, used: int
    ) -> LimitOutcome:
        """An allowed request's header fields, as gcra.py computes them, from the TAT it found (`found`
        seconds ahead of now) and the quota count after it."""
        # (Comparisons rather than max(): a builtin call each, on every request.)
        left = 0 if quota is None or used >= quota.requests else quota.requests - used
        quota_reset = None if end is None else end - now
        interval = call.interval
        if not interval:
            return _new_outcome((None, 0, 0.0, left, quota_reset, None))
        remaining = math.floor((call.tolerance - found - interval) / interval + 1e-9) + 1
        return _new_outcome(
            (None, remaining if remaining > 0 else 0, found + interval, left, quota_reset, None)  # noqa: FURB136
        )

    def _run(self, call: _Call, nanoseconds: float, want: int) -> Awaitable[bytes]:
        """One call of the script: its line of the reply. `want`: the script's third argument (below 0, a
        give-back, which is never run twice)."""
        if self._pipe is not None:
            return self._pipe.call(
                call.encoded_keys, call.arguments % nanoseconds + (bulk(b"%d" % want) if want else _NO_LEASE)
            )
        plain = (_NOW % nanoseconds, call.limits, b"%d" % want)
        if self._cluster_pipes is not None:
            arguments = call.arguments % nanoseconds + bulk(plain[2])
            return self._cluster_pipes.call(call.keys, call.encoded_keys, arguments, plain, replay=want >= 0)
        return self._through_redis_py(call, plain)

    async def _asking(self, call: _Call, nanoseconds: float, want: int) -> bytes:
        """A check that may take a lease: if its request goes away while it waits (a client that hung up),
        the call still runs in Redis, and what it leased of the quota is given back when it answers."""
        answer = asyncio.ensure_future(self._run(call, nanoseconds, want))
        try:
            return await asyncio.shield(answer)
        except asyncio.CancelledError:
            answer.add_done_callback(partial(self._abandoned, call))
            raise

    def _abandoned(self, call: _Call, answer: asyncio.Future[bytes]) -> None:
        if answer.cancelled() or answer.exception() is not None:
            return
        units = answer.result().rsplit(b",", 1)[-1]
        if units != b"0" and units.isdigit():
            lease = Lease(call, 0.0)
            lease.units = int(units)
            self._give_back(lease)

    async def _through_redis_py(self, call: _Call, arguments: tuple[bytes, str, bytes]) -> bytes:
        line = await self._script(keys=call.keys, args=arguments)
        return line.encode() if isinstance(line, str) else bytes(line)

    def _lapse(self, lease: Lease, expires: float) -> None:
        """A quota lease's end: what it left goes back, unless it was granted again since."""
        if lease.expires == expires:
            self._give_back(lease)

    def _give_back(self, lease: Lease) -> None:
        """The quota units `lease` holds unspent go back to Redis (the rate's lapse); nothing waits for it."""
        units, call = lease.units, lease.call
        lease.units = 0
        if not units or call.quota is None or self._closed:
            return
        if self._skip_until and time.monotonic() < self._skip_until:
            return
        try:
            giving = asyncio.ensure_future(self._run(call, (time.time() - EPOCH) * 1e9, -units))
        except RuntimeError:  # no running loop: the process is ending
            return
        self._giving_back.add(giving)
        giving.add_done_callback(self._given_back)

    def _given_back(self, giving: asyncio.Future[bytes]) -> None:
        self._giving_back.discard(giving)
        if not giving.cancelled() and giving.exception() is not None:
            log.debug("a lease's quota units were not given back: %s", giving.exception())

    def _call(
        self, token_id: str, rate: RateLimit | None, quota: Quota | None, period: str, end: float | None
    ) -> _Call:
        prefix = self._prefix
        keys = (limit_key(prefix, token_id, "rate"), limit_key(prefix, token_id, f"quota:{period}"))
        interval = 0.0 if rate is None else rate.interval
        tolerance = 0.0 if rate is None else interval * (rate.capacity - 1)
        # The counter expires a minute past the period's end: the key names its period, so a replica whose
        # clock runs a little behind still counts into the same key rather than into one already expired.
        expire = 0 if end is None else int(end) + 60
        limits = f"{interval!r} {tolerance!r} {0 if quota is None else quota.requests} {expire}"
        call = _Call(
            rate,
            quota,
            period,
            interval,
            tolerance,
            keys,
            limits,
            b"".join(bulk(key.encode()) for key in keys),
            b"$%d\r\n%s\r\n" % (_NOW_WIDTH, _NOW) + bulk(limits.encode()).replace(b"%", b"%%"),
        )
        if len(self._calls) >= self._max_entries:
            del self._calls[next(iter(self._calls))]  # the oldest prepared: it is only made again
        self._calls[token_id] = call
        return call
