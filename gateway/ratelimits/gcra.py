"""The decision on one request of a limited token, in-process: GCRA for the rate, a period counter for the quota.

GCRA (the generic cell rate algorithm, ATM's traffic policing, as in redis-cell and Stripe's limiter) keeps one
number per token, the theoretical arrival time (TAT): the moment the token's budget would be whole again. A
request is allowed when `now >= TAT - tolerance`, and moves TAT on by one emission interval. Against the
alternatives:

- a fixed window (Kong's and APISIX's counters) lets a client send twice the limit across a window boundary;
- a sliding log keeps one entry per request (memory grows with the limit);
- a sliding-window counter estimates, so the count it admits is approximate;
- a token bucket is the same behaviour as GCRA, but needs two numbers (tokens and the last refill) and a
  read-modify-write of both.

GCRA is exact, O(1) in time and memory, and one key with one expiry, which is what makes a single short Lua
script (shared.py) enough across replicas. This module is the same arithmetic for a process without Redis,
and the fallback while Redis does not answer.

Neither refusal consumes anything: a request refused by the rate does not count against the quota, and a
request refused by the quota does not use the rate's budget.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple, TypeVar

from gateway.ratelimits.policy import Quota, RateLimit

V = TypeVar("V")

RATE_LIMITED = "rate_limited"
QUOTA_EXCEEDED = "quota_exceeded"


class LimitOutcome(NamedTuple):
    """What one check decided, and what the RateLimit header fields say about it (headers.py).

    `refused`: None (allowed), RATE_LIMITED or QUOTA_EXCEEDED. Seconds are from `now`; `quota_reset` is None
    for a total quota (it never refills). `retry_after` is set on a refusal, None for a spent total quota."""

    refused: str | None
    rate_remaining: int
    rate_reset: float
    quota_remaining: int
    quota_reset: float | None
    retry_after: float | None


# TATs are kept in seconds since this moment (2026-01-01T00:00:00Z), not since 1970: a double then resolves
# well under a microsecond for decades, so even 100 000 requests a second are counted exactly.
EPOCH = 1_767_225_600.0
# A request is refused only when it comes more than SLACK early: a thousandth of its interval, plus 2 µs. A TAT
# is a sum of intervals, each addition rounded to the TAT's precision (about 4 ns in 2027, 8 ns from 2030), the
# same way each time, and a burst's rounding must not refuse its last request (a burst of 1000 at 3.6 s
# intervals admitted 999). 2 µs covers about 1000 additions in 2027; it stays under the shortest interval (10
# µs, 100 000 a second), so a burst never gets a whole request more.
SLACK_SHARE, SLACK_SECONDS = 1e-3, 2e-6


def gcra(tat: float | None, now: float, rate: RateLimit) -> tuple[float | None, int, float, float]:
    """One request against a TAT (None: the token was idle): (the new TAT, or None when refused; requests
    still allowed at once; seconds until the budget is whole; seconds to wait when refused)."""
    interval = rate.interval
    tolerance = interval * (rate.capacity - 1)
    base = now if tat is None or tat < now else tat
    allowed_at = base - tolerance
    if now + interval * SLACK_SHARE + SLACK_SECONDS < allowed_at:
        return None, 0, base - now, allowed_at - now
    new_tat = base + interval
    remaining = max(0, math.floor((now + tolerance - new_tat) / interval + 1e-9) + 1)
    return new_tat, remaining, new_tat - now, 0.0


def _unused(tat: float | None, now: float, rate: RateLimit) -> tuple[int, float]:
    """The rate's budget left without consuming any: (requests allowed at once, seconds until whole)."""
    interval = rate.interval
    base = now if tat is None or tat < now else tat
    return max(0, math.floor((now + interval * rate.capacity - base) / interval + 1e-9)), base - now


def refused_outcome(
    code: str,
    rate_remaining: int,
    rate_reset: float,
    quota: Quota | None,
    used: int,
    quota_reset: float | None,
    retry_after: float | None,
) -> LimitOutcome:
    remaining = 0 if quota is None else max(0, quota.requests - used)
    return LimitOutcome(code, rate_remaining, rate_reset, remaining, quota_reset, retry_after)


class LocalLimiter:
    """Limits counted in this process alone: exact for one process, per process with several (the fallback
    while Redis is down). Holds at most `max_entries` tokens' state, the least recently used dropped first."""

    def __init__(self, *, max_entries: int = 100_000) -> None:
        self._max_entries = max_entries
        self._tats: OrderedDict[str, float] = OrderedDict()
        self._counts: OrderedDict[str, tuple[str, int]] = OrderedDict()  # token id -> (period name, used)

    def __len__(self) -> int:
        return len(self._tats) + len(self._counts)

    def check(self, token_id: str, rate: RateLimit | None, quota: Quota | None, now: float) -> LimitOutcome:
        """A spent quota is answered first (its wait is the longer one), then the rate; only an allowed
        request is counted."""
        used, quota_reset, period = 0, None, ""
        if quota is not None:
            period, _, end = quota.window(now)
            held = self._counts.get(token_id)
            used = held[1] if held is not None and held[0] == period else 0
            quota_reset = None if end is None else end - now
        tat = self._tats.get(token_id)
        if quota is not None and used >= quota.requests:
            unused, rate_reset = (0, 0.0) if rate is None else _unused(tat, now - EPOCH, rate)
            return refused_outcome(QUOTA_EXCEEDED, unused, rate_reset, quota, used, quota_reset, quota_reset)
        rate_remaining, rate_reset = 0, 0.0
        if rate is not None:
            new_tat, rate_remaining, rate_reset, wait = gcra(tat, now - EPOCH, rate)
            if new_tat is None:
                return refused_outcome(RATE_LIMITED, 0, rate_reset, quota, used, quota_reset, wait)
            self._remember(self._tats, token_id, new_tat)
        quota_remaining = 0
        if quota is not None:
            self._remember(self._counts, token_id, (period, used + 1))
            quota_remaining = quota.requests - used - 1
        return LimitOutcome(None, rate_remaining, rate_reset, quota_remaining, quota_reset, None)

    def _remember(self, table: OrderedDict[str, V], token_id: str, value: V) -> None:
        table[token_id] = value
        table.move_to_end(token_id)
        while len(table) > self._max_entries:
            table.popitem(last=False)
