"""Rate limits and quotas across replicas: two real `gateway proxy` processes, one real redis-server, the
admin API in the test process on the same SQLite file. Counts are exact: Redis decides every request in one
script, so two replicas can never both spend the last request of a budget.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Gateway, GatewayFactory, Upstream
from tests.gateway.test_metrics import scrape, value
from tests.redis_server import RedisServer, free_port

HEALTH = "/lb-health"


class Replicas:
    def __init__(self, admin: Gateway, ports: list[int], session: aiohttp.ClientSession) -> None:
        self.admin = admin
        self.ports = ports
        self.session = session

    async def call(self, replica: int, token: str) -> tuple[int, str, dict[str, str]]:
        url = f"http://127.0.0.1:{self.ports[replica]}/api/posts"
        async with self.session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
            body = await response.json(content_type=None)
            code = body.get("code", "") if response.status >= 400 else ""
            return response.status, code, dict(response.headers)

    async def health(self, replica: int) -> tuple[int, dict[str, Any]]:
        async with self.session.get(f"http://127.0.0.1:{self.ports[replica]}{HEALTH}") as response:
            return response.status, await response.json(content_type=None)


async def until(probe: Callable[[], Awaitable[bool]], *, attempts: int = 400, pause: float = 0.05) -> None:
    for _ in range(attempts):
        if await probe():
            return
        await asyncio.sleep(pause)
    raise AssertionError(f"not true after {attempts} attempts")


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def replicas(
    start_gateway: GatewayFactory, own_redis: RedisServer, upstream: Upstream, tmp_path: Path
) -> AsyncIterator[Replicas]:
    admin = await start_gateway(planes=("admin",), redis_url=own_redis.url)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    environment.update(
        GATEWAY_DATABASE_URL=f"sqlite:///{admin.database}",
        GATEWAY_REDIS_URL=own_redis.url,
        GATEWAY_UPSTREAM=upstream.url,
        GATEWAY_PROXY_HEALTH_PATH=HEALTH,
        GATEWAY_ARGON2_TIME_COST="1",
        GATEWAY_ARGON2_MEMORY_COST_KIB="1024",
        GATEWAY_ACCESS_LOG="off",
    )
    ports = [free_port(), free_port()]
    logs = [(tmp_path / f"proxy-{n}.log").open("wb") for n in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "proxy", "--proxy-listen", f"127.0.0.1:{port}"],
            env=environment,
            stdout=log,
            stderr=log,
        )
        for port, log in zip(ports, logs, strict=True)
    ]
    session = aiohttp.ClientSession()
    cluster = Replicas(admin, ports, session)
    try:
        for replica, process in enumerate(processes):

            async def up(replica: int = replica, process: subprocess.Popen[bytes] = process) -> bool:
                assert process.poll() is None, (tmp_path / f"proxy-{replica}.log").read_text()
                try:
                    return (await cluster.health(replica))[0] == 200
                except aiohttp.ClientError:
                    return False

            await until(up, attempts=1200)
        yield cluster
    finally:
        await session.close()
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
        for log in logs:
            log.close()
        for replica in range(2):
            assert "Traceback" not in (tmp_path / f"proxy-{replica}.log").read_text()


async def _drive(cluster: Replicas, token: str, count: int) -> list[tuple[int, str, dict[str, str]]]:
    """`count` requests, alternating between the replicas, eight at a time."""
    answers: list[tuple[int, str, dict[str, str]]] = []
    for start in range(0, count, 8):
        answers += await asyncio.gather(
            *(cluster.call(n % 2, token) for n in range(start, min(count, start + 8)))
        )
    return answers


async def test_two_replicas_admit_exactly_the_quota_together(replicas: Replicas) -> None:
    created = await replicas.admin.create_token(quota={"requests": 25, "period": "day"})

    answers = await _drive(replicas, created["token"], 60)

    assert sum(status == 200 for status, _, _ in answers) == 25
    assert {(status, code) for status, code, _ in answers if status != 200} == {(429, "quota_exceeded")}
    remaining = sorted(
        int(headers["RateLimit"].split("r=")[1].split(";")[0]) for s, _, headers in answers if s == 200
    )
    assert remaining == list(range(25))  # each admitted request saw its own place in the one shared count
    assert all(headers["RateLimit-Policy"] == '"quota";q=25;w=86400' for _, _, headers in answers)
    assert all("Retry-After" in headers for status, _, headers in answers if status == 429)


async def test_two_replicas_share_one_rate_limit(replicas: Replicas) -> None:
    created = await replicas.admin.create_token(rate_limit={"requests": 12, "per_seconds": 3600})

    answers = await _drive(replicas, created["token"], 40)

    assert sum(status == 200 for status, _, _ in answers) == 12  # one more refills only after 300 s
    refused = [headers for status, _, headers in answers if status == 429]
    assert {code for status, code, _ in answers if status == 429} == {"rate_limited"}
    assert all(0 < int(headers["Retry-After"]) <= 300 for headers in refused)
    assert all(headers["RateLimit-Policy"] == '"rate";q=12;w=3600' for headers in refused)


async def test_a_patch_of_a_limit_holds_on_both_replicas(replicas: Replicas) -> None:
    created = await replicas.admin.create_token(quota={"requests": 2, "period": "total"})
    token = created["token"]
    assert sorted(status for status, _, _ in await _drive(replicas, token, 4)) == [200, 200, 429, 429]

    status, _ = await replicas.admin.admin_call(
        "PATCH", f"/v1/tokens/{created['id']}", json={"quota": {"requests": 3, "period": "total"}}
    )
    assert status == 200

    async def both_see_the_new_quota() -> bool:
        answers = [await replicas.call(n, token) for n in range(2)]
        return all(headers.get("RateLimit-Policy") == '"quota";q=3' for _, _, headers in answers)

    await until(both_see_the_new_quota)
    # The count carried over: 2 used, the new quota allows one more, which one of the probes above spent.
    assert {status for status, _, _ in await _drive(replicas, token, 2)} == {429}

    await replicas.admin.admin_call("PATCH", f"/v1/tokens/{created['id']}", json={"quota": None})

    async def both_unlimited() -> bool:
        answers = [await replicas.call(n, token) for n in range(2)]
        return all(status == 200 and "RateLimit" not in headers for status, _, headers in answers)

    await until(both_unlimited)


async def test_wrong_secrets_on_both_replicas_do_not_use_the_quota(replicas: Replicas) -> None:
    created = await replicas.admin.create_token(quota={"requests": 2, "period": "day"})
    token = created["token"]
    wrong = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")

    assert {(status, code) for status, code, _ in await _drive(replicas, wrong, 6)} == {
        (401, "invalid_token")
    }
    assert sorted(status for status, _, _ in await _drive(replicas, token, 3)) == [200, 200, 429]


async def test_redis_down_limits_hold_per_process_and_recover(
    replicas: Replicas, own_redis: RedisServer
) -> None:
    created = await replicas.admin.create_token(quota={"requests": 3, "period": "day"})
    token = created["token"]
    assert [status for status, _, _ in await _drive(replicas, token, 2)] == [200, 200]
    assert (await replicas.health(0))[1]["rate_limits"] == "shared"

    own_redis.kill()
    # Each replica now counts on its own, from zero: 3 each, then 429; never a 500.
    per_replica = [[(await replicas.call(n, token))[:2] for _ in range(4)] for n in range(2)]
    assert per_replica == [[(200, "")] * 3 + [(429, "quota_exceeded")]] * 2
    for replica in range(2):

        async def announced(replica: int = replica) -> bool:  # the health answer is kept for up to a second
            status, health = await replicas.health(replica)
            return status == 503 and health["rate_limits"] == "per process (redis unavailable)"

        await until(announced)

    own_redis.start()  # same port, empty

    async def shared_again() -> bool:
        await replicas.call(0, token)
        await replicas.call(1, token)
        healths = [await replicas.health(n) for n in range(2)]
        return all(health.get("rate_limits") == "shared" for _, health in healths)

    await until(shared_again)
    # Redis restarted empty: the shared count begins again, for both replicas together.
    fresh = await replicas.admin.create_token(quota={"requests": 3, "period": "day"})
    assert sum(status == 200 for status, _, _ in await _drive(replicas, fresh["token"], 8)) == 3


async def test_metrics_flag_per_process_counting_while_redis_is_down(
    start_gateway: GatewayFactory, own_redis: RedisServer
) -> None:
    gateway = await start_gateway(redis_url=own_redis.url)
    token = (await gateway.create_token(rate_limit={"requests": 100, "per_seconds": 60}))["token"]
    plain = (await gateway.create_token(name="unlimited"))["token"]
    assert (await gateway.call(token)).status == 200
    _, samples = await scrape(gateway)
    assert value(samples, "gateway_rate_limit_per_process") == 0
    assert value(samples, "gateway_rate_limit_checks_total", counted="redis") == 1
    for _ in range(3):
        assert (await gateway.call(plain)).status == 200  # no limits: no check, no Redis call
    _, samples = await scrape(gateway)
    assert value(samples, "gateway_rate_limit_checks_total", counted="redis") == 1

    own_redis.kill()
    response = await gateway.call(token)
    assert response.status == 200 and response.headers["RateLimit"].startswith('"rate";r=')
    _, samples = await scrape(gateway)
    assert value(samples, "gateway_rate_limit_per_process") == 1
    assert value(samples, "gateway_rate_limit_checks_total", counted="process") == 1
