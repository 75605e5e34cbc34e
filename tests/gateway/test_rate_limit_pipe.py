"""The limits script's own Redis connection (gateway/ratelimits/pipe.py), against a real redis-server: the
database named in the URL, a script cache emptied under it, many requests in flight on one connection, and
the checks of one event-loop turn sent as one EVALSHA, and those that come while it waits for its reply as
the next (counted by Redis's INFO commandstats)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from gateway.ratelimits.gcra import LocalLimiter
from gateway.ratelimits.pipe import MAX_BATCH, PipeProtocol
from gateway.ratelimits.policy import Quota, QuotaPeriod, RateLimit
from gateway.ratelimits.shared import RedisLimiter
from tests.conftest import GatewayFactory
from tests.redis_server import RedisServer


async def test_limits_live_in_the_database_the_url_names(
    start_gateway: GatewayFactory, redis_server: RedisServer, redis_url: str
) -> None:
    gateway = await start_gateway(redis_url=redis_url.rsplit("/", 1)[0] + "/5", redis_key_prefix="pipe:")
    created = await gateway.create_token(quota={"requests": 10, "period": "total"})

    assert (await gateway.call(created["token"])).status == 200

    async with redis.Redis(port=redis_server.port, db=5) as client:
        assert await client.get(f"pipe:limit:{{{created['id']}}}:quota:total") == b"1"
    async with redis.Redis(port=redis_server.port, db=0) as client:
        assert await client.keys("pipe:limit:*") == []


async def test_an_emptied_script_cache_is_refilled_without_a_failed_request(
    start_gateway: GatewayFactory, redis_server: RedisServer, redis_url: str
) -> None:
    gateway = await start_gateway(redis_url=redis_url)
    token = (await gateway.create_token(quota={"requests": 3, "period": "total"}))["token"]
    assert (await gateway.call(token)).status == 200

    async with redis.Redis(port=redis_server.port) as client:
        await client.script_flush()
    response = await gateway.call(token)

    assert response.status == 200 and response.headers["RateLimit"] == '"quota";r=1'
    assert gateway.core.limiter.mode == "shared"


async def test_concurrent_requests_on_one_connection_each_get_their_own_answer(
    start_gateway: GatewayFactory, redis_url: str
) -> None:
    gateway = await start_gateway(redis_url=redis_url)
    token = (await gateway.create_token(quota={"requests": 40, "period": "total"}))["token"]

    async def remaining() -> int:
        response = await gateway.call(token)
        assert response.status == 200
        return int(response.headers["RateLimit"].rsplit("r=", 1)[1])

    left = await asyncio.gather(*(remaining() for _ in range(40)))

    assert sorted(left) == list(range(40))
    assert (await gateway.call(token)).status == 429


class Recorder:
    """A waiter for one reply (pipe.Waiter): what the connection handed it."""

    def __init__(self) -> None:
        self.values: list[object] = []

    def answered(self, value: object) -> None:
        self.values.append(value)

    def failed(self, error: Exception) -> None:
        self.values.append(error)


async def test_replies_split_anywhere_across_reads_reach_their_callers_in_order() -> None:
    reply = b"*5\r\n:0\r\n:42\r\n$4\r\n17.5\r\n:3\r\n$1\r\n0\r\n"
    batch = b"$26\r\n0,9,0.01,0,0\n1,0,0.5,0,0.2\r\n"
    replies = reply + batch + b"-NOSCRIPT No matching script.\r\n"
    for cut in range(1, len(replies)):
        protocol = PipeProtocol()
        callers = [Recorder() for _ in range(3)]
        protocol.waiting.extend(callers)
        protocol.data_received(replies[:cut])
        protocol.data_received(replies[cut:])
        assert [caller.values for caller in callers[:2]] == [
            [[0, 42, b"17.5", 3, b"0"]],
            [b"0,9,0.01,0,0\n1,0,0.5,0,0.2"],
        ]
        assert [str(value) for value in callers[2].values] == ["NOSCRIPT No matching script."]


async def test_a_redis_that_stops_answering_falls_back_within_the_timeout(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        gateway = await start_gateway(redis_url=server.url)
        token = (await gateway.create_token(quota={"requests": 5, "period": "total"}))["token"]
        assert (await gateway.call(token)).status == 200
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)  # connected, but silent: no reset, no refusal
        try:
            response = await asyncio.wait_for(gateway.call(token), timeout=30)
            assert response.status == 200 and response.headers["RateLimit"] == '"quota";r=4'  # counted locally
            assert gateway.core.limiter.mode == "per process (redis unavailable)"
        finally:
            server.process.send_signal(signal.SIGCONT)
    finally:
        server.kill()


@pytest.fixture
async def limits(tmp_path: Path) -> AsyncIterator[tuple[RedisLimiter, redis.Redis]]:
    """The shared limiter on a Redis of its own: nothing else runs scripts there, so its counts are ours."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    client = redis.Redis(port=server.port)
    limiter = RedisLimiter(client, LocalLimiter())
    try:
        yield limiter, client
    finally:
        await limiter.close()
        await client.aclose()
        server.kill()


async def evalsha_calls(client: redis.Redis) -> int:
    return int((await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0))


async def test_checks_made_in_one_event_loop_turn_are_sent_as_one_evalsha(
    limits: tuple[RedisLimiter, redis.Redis],
) -> None:
    limiter, client = limits
    quota, now = Quota(requests=20, period=QuotaPeriod.TOTAL), 1_800_000_000.0
    window = quota.window(now)[::2]
    await limiter.check("warm", None, quota, now, window)  # connects and loads the script
    before = await evalsha_calls(client)

    outcomes = await asyncio.gather(*(limiter.check("t1", None, quota, now, window) for _ in range(21)))

    assert await evalsha_calls(client) == before + 1
    assert sorted(o.quota_remaining for o in outcomes if o.refused is None) == list(range(20))
    assert [outcome.refused for outcome in outcomes].count("quota_exceeded") == 1
    assert limiter.redis_checks == 22


async def test_checks_that_come_while_a_batch_waits_for_its_reply_go_out_together(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    client = redis.Redis(port=server.port)
    limiter = RedisLimiter(client, LocalLimiter())
    try:
        quota, now = Quota(requests=20, period=QuotaPeriod.TOTAL), 1_800_000_000.0
        window = quota.window(now)[::2]
        await limiter.check("warm", None, quota, now, window)
        before = await evalsha_calls(client)
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)  # the next batch waits for its reply
        try:
            checks = [asyncio.ensure_future(limiter.check("t1", None, quota, now, window))]
            for _ in range(5):  # five more turns, one check each, while the first batch is in flight
                await asyncio.sleep(0)
                checks.append(asyncio.ensure_future(limiter.check("t1", None, quota, now, window)))
            await asyncio.sleep(0)
        finally:
            server.process.send_signal(signal.SIGCONT)
        outcomes = await asyncio.gather(*checks)

        assert await evalsha_calls(client) == before + 2
        assert sorted(o.quota_remaining for o in outcomes) == list(range(14, 20))
    finally:
        await limiter.close()
        await client.aclose()
        server.kill()


async def test_one_batch_decides_each_token_alone_and_in_order(
    limits: tuple[RedisLimiter, redis.Redis],
) -> None:
    limiter, client = limits
    rate, quota = RateLimit(requests=3, per_seconds=60), Quota(requests=2, period=QuotaPeriod.DAY)
    now = 1_800_000_000.0
    window = quota.window(now)[::2]
    await limiter.check("warm", None, quota, now, window)
    before = await evalsha_calls(client)

    checks = [limiter.check("rated", rate, None, now) for _ in range(4)]
    checks += [limiter.check("quoted", None, quota, now, window) for _ in range(3)]
    checks += [limiter.check("both", rate, quota, now, window) for _ in range(3)]
    outcomes = await asyncio.gather(*checks)

    assert await evalsha_calls(client) == before + 1
    rated, quoted, both = outcomes[:4], outcomes[4:7], outcomes[7:]
    assert [(o.refused, o.rate_remaining) for o in rated] == [
        (None, 2), (None, 1), (None, 0), ("rate_limited", 0)
    ]
    assert rated[3].retry_after == pytest.approx(20.0)
    assert [(o.refused, o.quota_remaining) for o in quoted] == [(None, 1), (None, 0), ("quota_exceeded", 0)]
    assert [o.refused for o in both] == [None, None, "quota_exceeded"]
    assert [o.rate_remaining for o in both] == [2, 1, 1]  # the quota's refusal spent no rate


async def test_a_cancelled_check_leaves_the_others_of_its_batch_answered(
    limits: tuple[RedisLimiter, redis.Redis],
) -> None:
    limiter, client = limits
    quota, now = Quota(requests=10, period=QuotaPeriod.TOTAL), 1_800_000_000.0
    window = quota.window(now)[::2]
    await limiter.check("warm", None, quota, now, window)
    checks = [asyncio.ensure_future(limiter.check("t1", None, quota, now, window)) for _ in range(5)]
    await asyncio.sleep(0)  # every check is waiting on the batch's reply
    checks[2].cancel()

    done = await asyncio.gather(*checks, return_exceptions=True)

    assert isinstance(done[2], asyncio.CancelledError)
    answered = [outcome for outcome in done if not isinstance(outcome, BaseException)]
    assert len(answered) == 4 and all(outcome.refused is None for outcome in answered)
    assert not limiter.degraded
    # The cancelled check had joined its batch, so Redis counted it all the same.
    assert await client.get("gateway:limit:{t1}:quota:total") == b"5"


async def test_deleting_a_token_deletes_its_limit_counts_in_redis(
    start_gateway: GatewayFactory, redis_server: RedisServer, redis_url: str
) -> None:
    gateway = await start_gateway(redis_url=redis_url, redis_key_prefix="gone:")
    created = await gateway.create_token(
        rate_limit={"requests": 10, "per_seconds": 60}, quota={"requests": 10, "period": "total"}
    )
    assert (await gateway.call(created["token"])).status == 200
    async with redis.Redis(port=redis_server.port) as client:
        assert sorted(await client.keys(f"gone:limit:{{{created['id']}}}:*")) == [
            f"gone:limit:{{{created['id']}}}:quota:total".encode(),
            f"gone:limit:{{{created['id']}}}:rate".encode(),
        ]

        status, _ = await gateway.admin_call("DELETE", f"/v1/tokens/{created['id']}")

        assert status == 204
        assert await client.keys(f"gone:limit:{{{created['id']}}}:*") == []


async def test_a_turn_with_more_checks_than_a_batch_holds_is_sent_in_several(
    limits: tuple[RedisLimiter, redis.Redis],
) -> None:
    limiter, client = limits
    quota, now = Quota(requests=10_000, period=QuotaPeriod.TOTAL), 1_800_000_000.0
    window = quota.window(now)[::2]
    await limiter.check("warm", None, quota, now, window)
    before = await evalsha_calls(client)

    checks = [limiter.check("t1", None, quota, now, window) for _ in range(2 * MAX_BATCH + 1)]
    outcomes = await asyncio.gather(*checks)

    assert await evalsha_calls(client) == before + 3
    assert sorted(o.quota_remaining for o in outcomes) == list(range(10_000 - 2 * MAX_BATCH - 1, 10_000))


class OtherConnection(redis.Connection):
    """A plain connection under another class name: shared.py leaves what it does not know (TLS, Sentinel) to
    redis-py, one script call per check."""


async def test_checks_through_redis_py_count_as_the_pipe_does(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    pool = redis.ConnectionPool(connection_class=OtherConnection, port=server.port)
    client = redis.Redis(connection_pool=pool)
    limiter = RedisLimiter(client, LocalLimiter())
    try:
        rate, quota = RateLimit(requests=3, per_seconds=60), Quota(requests=4, period=QuotaPeriod.DAY)
        now = 1_800_000_000.0
        window = quota.window(now)[::2]
        outcomes = [await limiter.check("t1", rate, quota, now + n, window) for n in range(5)]

        assert [(o.refused, o.rate_remaining, o.quota_remaining) for o in outcomes] == [
            (None, 2, 3), (None, 1, 2), (None, 0, 1), ("rate_limited", 0, 1), ("rate_limited", 0, 1)
        ]
        assert outcomes[3].retry_after == pytest.approx(20 - 3)
        assert not limiter.degraded and limiter.redis_checks == 5
        assert await client.get("gateway:limit:{t1}:quota:" + window[0]) == b"3"
    finally:
        await limiter.close()
        await client.aclose()
        await pool.disconnect()
        server.kill()
