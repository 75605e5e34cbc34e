"""The per-token limits check the proxy and forward-auth run after a request is allowed (decision.py): the
token's rate_limit and quota, through Redis when configured (shared.py), in this process otherwise (gcra.py).

A token without limits is never checked (no Redis call, no work). A refusal is a GatewayError 429 with
`rate_limited` or `quota_exceeded`, Retry-After and the RateLimit fields; an allowed request of a limited
token gets its RateLimit fields to send with the answer. `on_refused` is the one place a refusal passes
through, for whoever counts outcomes per token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

from gateway.problems import GatewayError
from gateway.ratelimits.gcra import QUOTA_EXCEEDED, RATE_LIMITED, LimitOutcome, LocalLimiter
from gateway.ratelimits.headers import allowed_format, allowed_lines, policy_field, retry_after, state_field
from gateway.ratelimits.policy import Quota, RateLimit
from gateway.ratelimits.shared import RedisLimiter
from gateway.tokens import TokenRecord


class _Policy(NamedTuple):
    """A token's RateLimit-Policy, kept while its limits and quota period stay the same."""

    rate: RateLimit | None
    quota: Quota | None
    window: tuple[str, float | None]  # the quota's period now and its end, for RedisLimiter.check
    start: float  # when the period began and ends (-inf, inf: it does not end)
    end: float
    field: str
    lines: bytes  # both header lines of an allowed request, a format (headers.allowed_format)


class TokenLimiter:
    def __init__(
        self,
        *,
        local: LocalLimiter,
        shared: RedisLimiter | None = None,
        clock: Callable[[], float] = time.time,
        max_entries: int = 100_000,
    ) -> None:
        self.local = local
        self.shared = shared
        self._clock = clock
        self._policies: dict[str, _Policy] = {}  # token id -> its policy now
        self._max_entries = max_entries
        # Called with (token id, "rate_limited" | "quota_exceeded") for every refusal.
        self.on_refused: Callable[[str, str], None] | None = None

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()

    @property
    def mode(self) -> str:
        """Where limits are counted now: "shared" (Redis), "per process" (no Redis configured), or
        "per process (redis unavailable)"."""
        if self.shared is None:
            return "per process"
        return "per process (redis unavailable)" if self.shared.degraded else "shared"

    async def admit(self, record: TokenRecord) -> bytes:
        """Count one allowed request of a limited token: its response header lines, or a 429 GatewayError."""
        rate, quota = record.rate_limit, record.quota
        now = self._clock()
        policy = self._policies.get(record.id)
        if (
            policy is None
            or policy.rate is not rate
            or policy.quota is not quota
            or not policy.start <= now < policy.end
        ):
            policy = self._policy(record.id, rate, quota, now)
        shared = self.shared
        if shared is not None:
            leased = shared.spend_lease(record.id, rate, quota, now, policy.window)
            outcome = (
                await shared.check(record.id, rate, quota, now, policy.window) if leased is None else leased
            )
        else:
            outcome = self.local.check(record.id, rate, quota, now)
        if outcome.refused is not None:
            raise self._refusal(record.id, outcome, policy.field, state_field(outcome, rate, quota))
        return allowed_lines(policy.lines, outcome, rate, quota)

    def _policy(self, token_id: str, rate: RateLimit | None, quota: Quota | None, now: float) -> _Policy:
        period, start, end = ("", None, None) if quota is None else quota.window(now)
        field = policy_field(rate, quota, now)
        policy = _Policy(
            rate,
            quota,
            (period, end),
            -math.inf if start is None else start,
            math.inf if end is None else end,
            field,
            allowed_format(field, rate, quota, end is not None),
        )
        if len(self._policies) >= self._max_entries:
            del self._policies[next(iter(self._policies))]  # the oldest: it is only made again
        self._policies[token_id] = policy
        return policy

    def _refusal(self, token_id: str, outcome: LimitOutcome, policy: str, state: str) -> GatewayError:
        code = outcome.refused
        assert code is not None
        if self.on_refused is not None:
            self.on_refused(token_id, code)
        headers = {"RateLimit-Policy": policy, "RateLimit": state}
        wait = retry_after(outcome)
        if wait is not None:
            headers["Retry-After"] = wait
        if code == RATE_LIMITED:
            detail = f"This token's rate limit is used up; retry in {wait} second(s)."
        elif wait is None:
            detail = "This token's quota is used up; it does not refill."
        else:
            assert code == QUOTA_EXCEEDED
            detail = f"This token's quota for this period is used up; it refills in {wait} second(s)."
        return GatewayError(429, code, detail, headers=headers)
