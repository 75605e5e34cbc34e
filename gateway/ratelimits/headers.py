"""The IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers-11), as Structured Fields lists.

    RateLimit-Policy: "rate";q=100;w=60, "quota";q=10000;w=86400
    RateLimit: "rate";r=42;t=17, "quota";r=9958;t=3600

One item per limit the token has: "rate" (its rate_limit: q requests per w seconds) and "quota" (w is the
current day's or month's length; a total quota has no w). In RateLimit, r is what is left and t the seconds
until it is whole again: for the rate, until the GCRA budget has refilled completely (Retry-After, on a 429,
says when the next request is allowed); for a day or month quota, until the period ends; a total quota has no
t. Values are whole seconds, rounded up.
"""

from __future__ import annotations

import math

from gateway.ratelimits.gcra import LimitOutcome
from gateway.ratelimits.policy import Quota, RateLimit


def _seconds(value: float) -> int:
    return max(0, math.ceil(value - 1e-9))


def policy_field(rate: RateLimit | None, quota: Quota | None, now: float) -> str:
    items = []
    if rate is not None:
        items.append(f'"rate";q={rate.requests};w={rate.per_seconds}')
    if quota is not None:
        _, start, end = quota.window(now)
        window = "" if start is None or end is None else f";w={round(end - start)}"
        items.append(f'"quota";q={quota.requests}{window}')
    return ", ".join(items)


def state_field(outcome: LimitOutcome, rate: RateLimit | None, quota: Quota | None) -> str:
    items = []
    if rate is not None:
        items.append(f'"rate";r={outcome.rate_remaining};t={_seconds(outcome.rate_reset)}')
    if quota is not None:
        reset = "" if outcome.quota_reset is None else f";t={_seconds(outcome.quota_reset)}"
        items.append(f'"quota";r={outcome.quota_remaining}{reset}')
    return ", ".join(items)


def allowed_format(policy: str, rate: RateLimit | None, quota: Quota | None, period_ends: bool) -> bytes:
    """Both header lines of an allowed request as one bytes format, made once per token and quota period:
    `allowed_lines` fills in RateLimit's numbers (the text of `state_field`, for less work per request)."""
    items = []
    if rate is not None:
        items.append('"rate";r=%d;t=%d')
    if quota is not None:
        items.append('"quota";r=%d;t=%d' if period_ends else '"quota";r=%d')
    policy = policy.replace("%", "%%")
    return f"RateLimit-Policy: {policy}\r\nRateLimit: {', '.join(items)}\r\n".encode("ascii")


def allowed_lines(lines: bytes, outcome: LimitOutcome, rate: RateLimit | None, quota: Quota | None) -> bytes:
    """An allowed request's times are ahead of now (its rate's reset, its period's end)."""
    if quota is None:
        return lines % (outcome.rate_remaining, math.ceil(outcome.rate_reset - 1e-9))
    counted: tuple[int, ...] = (outcome.quota_remaining,)
    if outcome.quota_reset is not None:
        counted += (math.ceil(outcome.quota_reset - 1e-9),)
    if rate is not None:
        counted = (outcome.rate_remaining, math.ceil(outcome.rate_reset - 1e-9), *counted)
    return lines % counted


def retry_after(outcome: LimitOutcome) -> str | None:
    """Whole seconds, at least 1 (a client retrying at once would only be refused again); None when waiting
    will not help (a spent total quota)."""
    if outcome.retry_after is None:
        return None
    return str(max(1, math.ceil(outcome.retry_after - 1e-9)))
