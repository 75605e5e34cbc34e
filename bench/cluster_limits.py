"""CPU time per shared rate-limit check in the gateway process: one Redis (pipe.py), a Redis Cluster through
the per-primary pipes (cluster_pipes.py), and a cluster through redis-py's cluster client alone (what every
check would cost without the pipes). Starts its own redis-server and a 3+3 cluster on free ports.

    .venv/bin/python bench/cluster_limits.py [--checks 20000] [--concurrency 32]

CPU time (time.process_time) rather than wall time: the machine is shared; Redis's own work is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.ratelimits.gcra import LocalLimiter  # noqa: E402
from gateway.ratelimits.policy import RateLimit  # noqa: E402
from gateway.ratelimits.shared import RedisLimiter  # noqa: E402
from gateway.redis_cluster import GatewayCluster  # noqa: E402
from gateway.redis_tokens import connect, disconnect  # noqa: E402
from tests.redis_server import RedisClusterSet, RedisServer  # noqa: E402


async def cpu_per_check(url: str, *, checks: int, concurrency: int, pipes: bool) -> float:
    client = connect(url)
    limiter = RedisLimiter(client, LocalLimiter())
    if not pipes:
        assert isinstance(client, GatewayCluster)
        limiter._cluster_pipes = None  # the redis-py path, for comparison only
    rate = RateLimit(requests=10**9, per_seconds=1)
    tokens = [f"token{n:04d}" for n in range(concurrency)]

    async def worker(token: str, count: int) -> None:
        for _ in range(count):
            await limiter.check(token, rate, None, time.time())

    await asyncio.gather(*(worker(token, 50) for token in tokens))  # warm up: connections, scripts, layout
    started = time.process_time()
    await asyncio.gather(*(worker(token, checks // concurrency) for token in tokens))
    spent = time.process_time() - started
    await limiter.close()
    await disconnect(client)
    if limiter.fallback_checks:
        print(f"  ({limiter.fallback_checks} checks fell back to the process: Redis did not answer in time)")
    return spent / (checks // concurrency * concurrency) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        single = RedisServer(Path(directory) / "single")
        cluster = RedisClusterSet(Path(directory) / "cluster")
        try:
            single.start()
            cluster.start()
            runs = [
                ("one Redis, pipe", single.url, True),
                ("cluster, per-primary pipes", cluster.url(count=3), True),
                ("cluster, redis-py only", cluster.url(count=3), False),
            ]
            for name, url, pipes in runs:
                micros = asyncio.run(
                    cpu_per_check(url, checks=options.checks, concurrency=options.concurrency, pipes=pipes)
                )
                print(f"{name:30} {micros:8.1f} us CPU per check")
        finally:
            single.kill()
            cluster.stop()


if __name__ == "__main__":
    main()
