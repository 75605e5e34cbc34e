"""The per-token limits check the proxy and forward-auth run after a request is allowed (decision.py): the
token's rate_limit and quota, through Redis when configured (shared.py), in this process otherwise (gcra.py).

A token without limits is never checked (no Redis call, no work). A refusal is a GatewayError 429 with
`rate_limited` or `quota_exceeded`, Retry-After and the RateLimit fields; an allowed request of a limited
token gets its RateLimit fields to send with the answer. `on_refused` is the one place a refusal passes
through, for whoever counts outcomes per token.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.problems import GatewayError
from gateway.ratelimits.gcra import QUOTA_EXCEEDED, RATE_LIMITED, LimitOutcome, LocalLimiter
from gateway.ratelimits.headers import policy_field, retry_after, state_field
from gateway.ratelimits.shared import RedisLimiter
from gateway.tokens import TokenRecord


class TokenLimiter:
    def __init__(
        self,
        *,
        local: LocalLimiter,
        shared: RedisLimiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.local = local
        self.shared = shared
        self._clock = clock
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
        if self.shared is not None:
            outcome = await self.shared.check(record.id, rate, quota, now)
        else:
            outcome = self.local.check(record.id, rate, quota, now)
        policy = policy_field(rate, quota, now)
        state = state_field(outcome, rate, quota)
        if outcome.refused is not None:
            raise self._refusal(record.id, outcome, policy, state)
        return f"RateLimit-Policy: {policy}\r\nRateLimit: {state}\r\n".encode("ascii")

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
