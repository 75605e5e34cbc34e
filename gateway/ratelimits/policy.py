"""A token's limits as the store and the admin API hold them: a rate (GCRA) and a quota (a counted period).

`RateLimit(requests=100, per_seconds=60, burst=20)`: on average 100 requests per 60 seconds, at most 20 of
them back to back (`burst` defaults to `requests`: a client may spend a whole window's worth at once, then
one request every per_seconds / requests seconds).

`Quota(requests=10_000, period="day")`: that many requests per UTC calendar day ("month": per UTC calendar
month; "total": that many uses, ever, never refilled).

Both are immutable values; None on a token means unlimited.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Bounds the admin API enforces (validation.py) and the limiters rely on: a window of at most a year, counts
# that stay exact in a double (Lua numbers) and in a Redis integer.
MAX_REQUESTS = 10**9
MAX_PER_SECONDS = 366 * 24 * 3600
MAX_RATE_PER_SECOND = 100_000  # GCRA's times stay exact to well under one emission interval


class QuotaPeriod(enum.StrEnum):
    DAY = "day"
    MONTH = "month"
    TOTAL = "total"


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests: int
    per_seconds: int
    burst: int | None = None

    @property
    def capacity(self) -> int:
        """How many requests may arrive at once: `burst`, or a whole window's worth."""
        return self.requests if self.burst is None else self.burst

    @property
    def interval(self) -> float:
        """Seconds one request uses up: GCRA's emission interval."""
        return self.per_seconds / self.requests

    def view(self) -> dict[str, Any]:
        return {"requests": self.requests, "per_seconds": self.per_seconds, "burst": self.burst}


@dataclass(frozen=True, slots=True)
class Quota:
    requests: int
    period: QuotaPeriod

    def window(self, now: float) -> tuple[str, float | None, float | None]:
        """The period that `now` (Unix seconds) falls in: a name for its counter, its start and its end (the
        counter's expiry), both None for a total quota. Calendar periods are UTC: 2027-03-31T23:59:59Z counts
        in March, a second later in April."""
        if self.period is QuotaPeriod.TOTAL:
            return "total", None, None
        moment = datetime.fromtimestamp(now, UTC)
        if self.period is QuotaPeriod.DAY:
            start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
            end_day = start.toordinal() + 1
            end = datetime.fromordinal(end_day).replace(tzinfo=UTC)
            return f"d{start:%Y%m%d}", start.timestamp(), end.timestamp()
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        end = start.replace(year=year, month=month)
        return f"m{start:%Y%m}", start.timestamp(), end.timestamp()

    def view(self) -> dict[str, Any]:
        return {"requests": self.requests, "period": self.period.value}


def rate_limit_from_json(data: dict[str, Any] | None) -> RateLimit | None:
    """From the stored (already validated) form."""
    if data is None:
        return None
    return RateLimit(requests=data["requests"], per_seconds=data["per_seconds"], burst=data.get("burst"))


def quota_from_json(data: dict[str, Any] | None) -> Quota | None:
    if data is None:
        return None
    return Quota(requests=data["requests"], period=QuotaPeriod(data["period"]))
