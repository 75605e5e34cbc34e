"""Requests per token, per hour and per day, by outcome: the buckets, their bounds, and the admin's reading.
Also how the admin reads a rotation's previous secret's use, counted beside them (usage.py).

The proxy counts each decision in memory by UTC hour (usage.py) and writes the counts in batches, each hour's
counts also added to its UTC day. They are kept in Redis when proxies share one (redis_tokens.py: hashes that
expire), else in the store (a table pruned on every write). Hour buckets are kept 8 days (7 are shown), day
buckets 91 (90 are shown): memory and rows per token are bounded whatever the traffic.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway.tokens import format_time

HOUR = 3600
DAY = 24 * HOUR


class Outcome(enum.StrEnum):
    ALLOWED = "allowed"
    REFUSED_LEVEL = "refused_level"  # the access level does not allow the method and path
    REFUSED_IP = "refused_ip"  # the client address is outside the token's allowed ranges
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"


OUTCOMES: tuple[Outcome, ...] = tuple(Outcome)

# A refusal's problem code -> what it counts as; other refusals (a malformed request) are not counted.
OUTCOME_OF_CODE: Mapping[str, Outcome] = {
    "insufficient_access_level": Outcome.REFUSED_LEVEL,
    "ip_not_allowed": Outcome.REFUSED_IP,
    "rate_limited": Outcome.RATE_LIMITED,
    "quota_exceeded": Outcome.QUOTA_EXCEEDED,
}


class Granularity(enum.StrEnum):
    HOUR = "hour"
    DAY = "day"

    @property
    def seconds(self) -> int:
        return HOUR if self is Granularity.HOUR else DAY

    @property
    def shown(self) -> int:
        """Buckets an answer holds: 7 days of hours, 90 days."""
        return 7 * 24 if self is Granularity.HOUR else 90

    @property
    def kept(self) -> int:
        """Seconds a bucket is kept after it starts: one bucket more than is shown, and a day to spare."""
        return 8 * DAY if self is Granularity.HOUR else 91 * DAY


# (token id, granularity, bucket start in unix seconds, outcome) -> requests
Counts = dict[tuple[str, Granularity, int, Outcome], int]
# (token id, the rotation's time) -> (uses of the previous secret, the last one's time, its address or "")
PreviousUses = Mapping[tuple[str, datetime], tuple[int, datetime, str]]
# (token id, client address) -> (requests allowed from it, the last one's time)
AddressUses = Mapping[tuple[str, str], tuple[int, datetime]]
RECENT_ADDRESSES = 5
"""Distinct client addresses kept per token: the most recently used, each with its count."""


def bucket_start(moment: float, granularity: Granularity) -> int:
    return int(moment // granularity.seconds) * granularity.seconds


def roll_up(hourly: Mapping[tuple[int, str, Outcome], int]) -> Counts:
    """Counts by (hour start, token, outcome) as the rows to add: each hour's, and its day's."""
    rows: Counts = {}
    for (hour, token_id, outcome), count in hourly.items():
        rows[token_id, Granularity.HOUR, hour, outcome] = rows.get((token_id, Granularity.HOUR, hour, outcome), 0) + count
        day = hour - hour % DAY
        rows[token_id, Granularity.DAY, day, outcome] = rows.get((token_id, Granularity.DAY, day, outcome), 0) + count
    return rows


def first_shown(granularity: Granularity, now: float) -> int:
    """The start of the oldest bucket an answer shows: the current bucket is the last of `shown`."""
    return bucket_start(now, granularity) - (granularity.shown - 1) * granularity.seconds


def last_24h_start(now: float) -> int:
    """The hour buckets that make "the last 24 hours": the current hour and the 23 before it."""
    return bucket_start(now, Granularity.HOUR) - 23 * HOUR


class CountReader(Protocol):
    """Where the admin reads counts: Redis when proxies share one, else the store."""

    async def read_counts(
        self, token_id: str, granularity: Granularity, since: int
    ) -> dict[tuple[int, Outcome], int]:
        """Counts by (bucket start, outcome) for buckets starting at `since` or later."""
        ...

    async def requests_since(self, token_ids: Sequence[str], since: int) -> dict[str, int]:
        """Requests of every outcome in the hour buckets starting at `since` or later, per token."""
        ...

    async def previous_secret_use(self, token_id: str, rotated_at: datetime) -> tuple[int, datetime, str] | None:
        """Since the rotation at `rotated_at`: uses of the previous secret, the last one's time and address."""
        ...

    async def recent_addresses(self, token_id: str) -> list[tuple[str, int, datetime]]:
        """The last RECENT_ADDRESSES distinct addresses the token was allowed from: (address, requests, last
        time), the most recent first."""
        ...


def usage_answer(
    token_id: str, granularity: Granularity, now: float, counts: Mapping[tuple[int, Outcome], int]
) -> dict[str, Any]:
    """The admin API's answer: every bucket shown, oldest first, zeros included, with totals."""
    start = first_shown(granularity, now)
    step = granularity.seconds
    buckets: list[dict[str, Any]] = []
    totals = dict.fromkeys(OUTCOMES, 0)
    for number in range(granularity.shown):
        at = start + number * step
        bucket: dict[str, Any] = {"start": _time(at)}
        for outcome in OUTCOMES:
            count = counts.get((at, outcome), 0)
            bucket[outcome.value] = count
            totals[outcome] += count
        buckets.append(bucket)
    return {
        "token_id": token_id,
        "granularity": granularity.value,
        "bucket_seconds": step,
        "from": _time(start),
        "to": _time(start + granularity.shown * step),
        "outcomes": [outcome.value for outcome in OUTCOMES],
        "totals": {outcome.value: count for outcome, count in totals.items()},
        "buckets": buckets,
    }


def parse_outcome(text: str) -> Outcome | None:
    try:
        return Outcome(text)
    except ValueError:
        return None


def sum_by_token(rows: Iterable[tuple[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for token_id, count in rows:
        totals[token_id] = totals.get(token_id, 0) + count
    return totals


def _time(unix: int) -> str:
    text = format_time(datetime.fromtimestamp(unix, UTC))
    assert text is not None
    return text.replace(".000000Z", "Z")
