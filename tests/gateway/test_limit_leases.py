"""Leases (gateway/ratelimits/leases.py): a busy token far below its limits takes shares of its budget in one
check and spends them in the process; near a limit every request is checked in Redis, so two replicas still
never admit more than the limit. Real redis-server; the clock is passed in, so nothing refills meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as redis

from gateway.ratelimits.gcra import LimitOutcome, LocalLimiter
from gateway.ratelimits.leases import MIN_LEASE
from gateway.ratelimits.policy import Quota, QuotaPeriod, RateLimit
from gateway.ratelimits.shared import RedisLimiter
from tests.conftest import GatewayFactory, SettableClock
from tests.gateway.test_metrics import scrape, value
from tests.redis_server import RedisServer

NOW = 1_800_000_000.0
# One request per second, a burst of 100 000: far below the limit for every test here. (Redis expires a TAT
# key when its budget is whole, in real milliseconds; with a clock that stands still, a 10 µs interval would
# let the key expire between two requests on a slow machine.)
GENEROUS = RateLimit(requests=100_000, per_seconds=100_000)
TOTAL_KEY = "gateway:limit:{t1}:quota:total"


class Replicas:
    """Two limiters with leases on one Redis, as two `gateway proxy` processes hold them."""

    def __init__(self, server: RedisServer) -> None:
        self.client = redis.Redis(port=server.port)
        self.limiters = [RedisLimiter(self.client, LocalLimiter(), leases=True) for _ in range(2)]

    async def close(self) -> None:
        for limiter in self.limiters:
            await limiter.close()
        await self.client.aclose()

    async def quota_used(self) -> int:
        return int(await self.client.get(TOTAL_KEY) or 0)

    async def until_quota_used(self, count: int) -> None:
        """Until Redis's count of the total quota is `count` (a give-back lands after its lease's end)."""

        async def reached() -> bool:
            return await self.quota_used() == count

        await until(reached)


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Replicas]:
    pair = Replicas(redis_server)
    await pair.client.flushdb()
    try:
        yield pair
    finally:
        await pair.close()


def checker(
    limiter: RedisLimiter, rate: RateLimit | None, quota: Quota | None
) -> Callable[[], Awaitable[LimitOutcome]]:
    window = ("", None) if quota is None else quota.window(NOW)[::2]
    return lambda: limiter.check("t1", rate, quota, NOW, window)


async def until(probe: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(200):
        if await probe():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("not true after 10 s")


async def test_a_busy_token_far_below_its_limits_is_checked_in_redis_once_per_lease(
    replicas: Replicas,
) -> None:
    limiter = replicas.limiters[0]
    rate, quota = (
        GENEROUS,
        Quota(requests=1_000_000, period=QuotaPeriod.TOTAL),
    )
    check = checker(limiter, rate, quota)

    outcomes = [await check() for _ in range(3000)]

    assert [o.refused for o in outcomes] == [None] * 3000
    # What each request is told is exact, as if every one had been checked in Redis alone.
    assert [o.quota_remaining for o in outcomes] == list(range(999_999, 996_999, -1))
    assert [o.rate_remaining for o in outcomes] == list(range(99_999, 96_999, -1))
    assert limiter.redis_checks + limiter.leased_checks == 3000
    # Checked alone until busy (2 x MIN_LEASE requests), then leases of half the use so far, up to MAX_LEASE.
    assert 2 * MIN_LEASE <= limiter.redis_checks < 2 * MIN_LEASE + 20
    assert await replicas.quota_used() >= 3000  # the lease's units are taken in Redis before they are spent


async def counts_after(
    limiter: RedisLimiter, check: Callable[[], Awaitable[LimitOutcome]], n: int
) -> tuple[int, int]:
    for _ in range(n):
        assert (await check()).refused is None
    return limiter.redis_checks, limiter.leased_checks


async def test_a_lease_is_half_the_use_once_the_token_is_busy(replicas: Replicas) -> None:
    limiter = replicas.limiters[0]
    check = checker(limiter, GENEROUS, None)

    # The clock stands still: all in one period. Checked alone until 2 x MIN_LEASE requests, then each lease
    # is half the requests so far: 8 units at the 16th, 12 at the 25th (16 + 8 + 1), 18 at the 38th.
    assert await counts_after(limiter, check, 15) == (15, 0)
    assert await counts_after(limiter, check, 1) == (16, 0)
    assert await counts_after(limiter, check, 8) == (16, 8)
    assert await counts_after(limiter, check, 1) == (17, 8)
    assert await counts_after(limiter, check, 12) == (17, 20)
    assert await counts_after(limiter, check, 1) == (18, 20)
    assert await counts_after(limiter, check, 18) == (18, 38)


async def test_a_lease_is_sized_by_the_last_period_and_not_after_an_idle_one(replicas: Replicas) -> None:
    limiter = replicas.limiters[0]
    rate = GENEROUS

    def at(seconds: float) -> Callable[[], Awaitable[LimitOutcome]]:
        return lambda: limiter.check("t1", rate, None, NOW + seconds)

    assert await counts_after(limiter, at(0), 24) == (16, 8)
    # The next period (0.3 s on): sized by the last one's 24 requests at once.
    assert await counts_after(limiter, at(0.3), 1) == (17, 8)
    assert await counts_after(limiter, at(0.3), 12) == (17, 20)
    assert await counts_after(limiter, at(0.3), 1) == (18, 20)  # still 12: the last period's 24 / 2
    assert await counts_after(limiter, at(0.3), 12) == (18, 32)
    # After more than two periods without a request the token is not busy: checked alone again, however
    # busy the period before the pause was (26 requests).
    assert await counts_after(limiter, at(1.0), 15) == (33, 32)
    assert await counts_after(limiter, at(1.0), 1) == (34, 32)
    assert await counts_after(limiter, at(1.0), 8) == (34, 40)


async def test_a_lease_answers_as_redis_would_while_time_passes(replicas: Replicas) -> None:
    leased, alone = replicas.limiters[0], RedisLimiter(replicas.client, LocalLimiter(), leases=False)
    rate = RateLimit(requests=100, per_seconds=1, burst=50_000)  # one request per 10 ms
    quota = Quota(requests=1_000_000, period=QuotaPeriod.DAY)
    window = quota.window(NOW)[::2]
    try:
        # 100 at once (one batch each): each TAT is a second ahead, so Redis keeps its key (it expires a
        # TAT when the budget is whole, in real time) however slow the machine.
        await asyncio.gather(*(leased.check("t1", rate, quota, NOW, window) for _ in range(100)))
        await asyncio.gather(*(alone.check("t2", rate, quota, NOW, window) for _ in range(100)))
        # Two leases (50 units, then 76) and no lapse in these 100 steps of 3.7 ms: a lapsed rate unit stays
        # spent in Redis, and the two tokens would then differ by it.
        for n in range(1, 100):
            now = NOW + n * 3.7e-3  # faster than the rate refills: the budget drains, never whole again
            mine = await leased.check("t1", rate, quota, now, window)
            theirs = await alone.check("t2", rate, quota, now, window)
            # Redis's TAT is absolute seconds, each addition rounded (a few ns); the lease's is relative.
            assert mine.quota_remaining == theirs.quota_remaining
            assert abs(mine.rate_remaining - theirs.rate_remaining) <= 1
            assert mine.rate_reset == pytest.approx(theirs.rate_reset, abs=1e-6)
    finally:
        await alone.close()
    assert leased.leased_checks > 50


async def test_a_lease_spent_after_its_budget_refilled_says_it_is_whole(replicas: Replicas) -> None:
    limiter = replicas.limiters[0]
    rate = RateLimit(requests=100_000, per_seconds=1)
    for _ in range(16):  # the 16th takes a lease of 8
        await limiter.check("t1", rate, None, NOW)

    later = await limiter.check(
        "t1", rate, None, NOW + 0.2
    )  # within the lease, but 0.2 s is 20 000 intervals

    assert limiter.leased_checks == 1
    assert (later.rate_remaining, later.rate_reset) == (99_999, pytest.approx(1e-5))


async def test_near_a_limit_every_request_is_checked_in_redis(replicas: Replicas) -> None:
    first, second = replicas.limiters
    quota = Quota(requests=16, period=QuotaPeriod.TOTAL)  # never 16 requests' worth free after a request

    outcomes = []
    for _ in range(20):
        for limiter in (first, second):
            outcomes.append(await checker(limiter, None, quota)())

    assert [o.refused for o in outcomes].count(None) == 16
    assert {o.refused for o in outcomes[16:]} == {"quota_exceeded"}
    assert first.leased_checks == second.leased_checks == 0
    assert first.redis_checks == second.redis_checks == 20


@pytest.mark.parametrize(
    ("rate", "quota", "refusal"),
    [
        (RateLimit(requests=1000, per_seconds=3600), None, "rate_limited"),
        (None, Quota(requests=1000, period=QuotaPeriod.TOTAL), "quota_exceeded"),
        (
            RateLimit(requests=5000, per_seconds=3600, burst=1200),
            Quota(requests=1000, period=QuotaPeriod.TOTAL),
            "quota_exceeded",
        ),
    ],
    ids=["rate", "quota", "both"],
)
async def test_two_replicas_with_leases_admit_exactly_the_limit(
    replicas: Replicas, rate: RateLimit | None, quota: Quota | None, refusal: str
) -> None:
    checks = [checker(limiter, rate, quota) for limiter in replicas.limiters]

    outcomes: list[LimitOutcome] = []
    for _ in range(60):  # both replicas busy, 25 checks each per turn, until well past the limit
        outcomes += await asyncio.gather(*(check() for check in checks for _ in range(25)))

    admitted = [o.refused for o in outcomes].count(None)
    assert admitted == 1000
    assert sum(limiter.leased_checks for limiter in replicas.limiters) > 0
    assert {o.refused for o in outcomes} - {None} == {refusal}


async def busy_on_a_quota(limiter: RedisLimiter, requests: int) -> Callable[[], Awaitable[LimitOutcome]]:
    """`requests` checks of a token with a total quota of 100 000 (from the 16th on, it holds leases)."""
    check = checker(limiter, None, Quota(requests=100_000, period=QuotaPeriod.TOTAL))
    for _ in range(requests):
        await check()
    return check


async def test_a_quota_lease_gives_back_what_it_did_not_spend_when_it_ends(replicas: Replicas) -> None:
    limiter = replicas.limiters[0]
    check = await busy_on_a_quota(limiter, 100)
    assert await replicas.quota_used() > 100  # units held by the lease

    await replicas.until_quota_used(100)
    assert (await check()).quota_remaining == 100_000 - 101


async def test_a_lease_taken_for_a_request_that_went_away_is_given_back(replicas: Replicas) -> None:
    check = await busy_on_a_quota(replicas.limiters[0], 15)
    asking = asyncio.ensure_future(check())  # the 16th asks for 8 units more
    await asyncio.sleep(0)  # its call is in the pipe's batch
    asking.cancel()  # the client hung up: Redis still runs the call

    await replicas.until_quota_used(16)
    with pytest.raises(asyncio.CancelledError):
        await asking


async def test_closing_gives_back_a_quota_lease(replicas: Replicas) -> None:
    limiter = replicas.limiters[0]
    await busy_on_a_quota(limiter, 100)
    assert await replicas.quota_used() > 100

    await limiter.close()

    assert await replicas.quota_used() == 100


async def test_a_limit_change_ends_the_lease_at_once(replicas: Replicas) -> None:
    limiter = replicas.limiters[0]
    quota = Quota(requests=100_000, period=QuotaPeriod.TOTAL)
    for _ in range(100):
        await checker(limiter, None, quota)()
    checked = limiter.redis_checks

    lowered = Quota(requests=150, period=QuotaPeriod.TOTAL)  # as a PATCH makes a new record
    outcome = await checker(limiter, None, lowered)()

    assert limiter.redis_checks == checked + 1
    assert outcome.refused is None and outcome.quota_remaining == 150 - 101
    assert await replicas.quota_used() == 101  # the old lease's units were given back first


async def test_without_leases_every_check_is_one_call_of_the_script(redis_server: RedisServer) -> None:
    async with redis.Redis(port=redis_server.port) as client:
        limiter = RedisLimiter(client, LocalLimiter(), leases=False)
        try:
            check = checker(limiter, GENEROUS, None)
            for _ in range(200):
                await check()
        finally:
            await limiter.close()
    assert limiter.redis_checks == 200 and limiter.leased_checks == 0


async def test_through_the_proxy_a_leased_token_counts_down_one_by_one(
    start_gateway: GatewayFactory, redis_url: str
) -> None:
    gateway = await start_gateway(redis_url=redis_url, clock=SettableClock())  # still: all in one period
    token = (await gateway.create_token(quota={"requests": 100_000, "period": "day"}))["token"]

    remaining = []
    for _ in range(60):
        response = await gateway.call(token)
        assert response.status == 200
        remaining.append(int(response.headers["RateLimit"].split("r=")[1].split(";")[0]))

    assert remaining == list(range(99_999, 99_939, -1))
    _, samples = await scrape(gateway)
    leased = value(samples, "gateway_rate_limit_checks_total", counted="lease")
    checked = value(samples, "gateway_rate_limit_checks_total", counted="redis")
    assert leased > 0 and leased + checked == 60


async def test_the_setting_turns_leases_off(start_gateway: GatewayFactory, redis_url: str) -> None:
    gateway = await start_gateway(redis_url=redis_url, limit_leases=False)
    token = (await gateway.create_token(quota={"requests": 100_000, "period": "day"}))["token"]

    for _ in range(30):
        assert (await gateway.call(token)).status == 200

    shared = gateway.core.limiter.shared
    assert shared is not None and shared.leased_checks == 0 and shared.redis_checks == 30


@pytest.mark.parametrize("where", ["redis", "process"])
async def test_a_whole_burst_is_admitted_whatever_the_rounding_of_its_intervals(
    redis_server: RedisServer, where: str
) -> None:
    rate = RateLimit(requests=1000, per_seconds=3600)  # 3.6 s intervals: each addition to the TAT rounds
    async with redis.Redis(port=redis_server.port) as client:
        await client.flushdb()
        shared = RedisLimiter(client, LocalLimiter())
        local = LocalLimiter()
        try:
            outcomes = []
            for _ in range(1001):
                if where == "redis":
                    outcomes.append(await shared.check("t1", rate, None, NOW))
                else:
                    outcomes.append(local.check("t1", rate, None, NOW))
        finally:
            await shared.close()

    assert [o.refused for o in outcomes] == [None] * 1000 + ["rate_limited"]
