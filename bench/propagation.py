"""How fast does a token change reach every proxy replica?

Starts a real redis-server, one `gateway admin` process and two `gateway proxy` processes (each on its own
port, sharing the store and Redis), keeps traffic flowing through both replicas, and makes at least 200
changes through the admin API: disable, enable, rotate, edit ranges (out and back in), delete. For each, it
measures the time from the admin API's 2xx until each replica answers with the new decision.

    .venv/bin/python bench/propagation.py [--cycles 34] [--store sqlite|postgresql] [--redis up|stopped]
                                          [--out bench/results/propagation.md]

`--store postgresql` runs the store on a PostgreSQL server of its own (initdb into the temporary directory,
as the test suite does); `--redis stopped` (PostgreSQL only) kills Redis once every process is up, so that
changes reach the replicas through PostgreSQL's NOTIFY alone. On PostgreSQL every process trusts a cached
token for `cache_ttl` = 60 s, so no entry expiring can explain a lag under a minute.

Run by hand (it is not a test): it prints a table and writes it to the output file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/postgres_server.py
from tests.postgres_server import PostgresServer  # noqa: E402

ADMIN_KEY = "bench-admin-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.05)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


class Bench:
    def __init__(
        self, workdir: Path, *, store: str = "sqlite", redis: str = "up", access_log: bool = False
    ) -> None:
        self.workdir = workdir
        self.access_log = access_log
        self.store = store
        self.redis = redis
        self.postgres: PostgresServer | None = None
        self.redis_process: subprocess.Popen[bytes] | None = None
        self.processes: list[subprocess.Popen[bytes]] = []
        self.redis_port = free_port()
        self.upstream_port = free_port()
        self.admin_port = free_port()
        self.proxy_ports = [free_port(), free_port()]
        self.metrics_ports = [free_port(), free_port()]  # each proxy's /metrics (the admin key reads them)

    def spawn(self, argv: list[str], **environment: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(environment)
        log = open(self.workdir / f"process-{len(self.processes)}.log", "wb")
        self.processes.append(subprocess.Popen(argv, env=env, stdout=log, stderr=log))

    async def start(self) -> None:
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            sys.exit("redis-server is not installed (scripts/test installs it)")
        self.spawn([redis_server, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                    "--dir", str(self.workdir)])
        self.redis_process = self.processes[-1]
        database_url = f"sqlite:///{self.workdir / 'gateway.db'}"
        if self.store == "postgresql":
            self.postgres = PostgresServer()
            self.postgres.initialise()
            self.postgres.start()
            database_url = self.postgres.url()
        self.spawn([sys.executable, "-c",
                    "import sys; from aiohttp import web; from gateway.demo_upstream import create_demo_upstream_app;"
                    f"web.run_app(create_demo_upstream_app(), host='127.0.0.1', port={self.upstream_port},"
                    " access_log=None, print=None)"])
        common = {
            "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "GATEWAY_DATABASE_URL": database_url,
            "GATEWAY_UPSTREAM": f"http://127.0.0.1:{self.upstream_port}",
            "GATEWAY_ADMIN_KEY": ADMIN_KEY,
            "GATEWAY_ACCESS_LOG": "true" if self.access_log else "false",
            "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
        }
        if self.store == "postgresql":
            common["GATEWAY_CACHE_TTL"] = "60"
        self.environment = common  # for a further process of the same deployment
        await wait_http(f"http://127.0.0.1:{self.upstream_port}/")
        migrate = ["--migrate"] if self.store == "postgresql" else []
        self.spawn([sys.executable, "-m", "gateway", "admin", *migrate], **common)
        await wait_http(f"http://127.0.0.1:{self.admin_port}/healthz")
        for port, metrics_port in zip(self.proxy_ports, self.metrics_ports, strict=True):
            self.spawn([sys.executable, "-m", "gateway", "proxy"], **common,
                       GATEWAY_PROXY_LISTEN=f"127.0.0.1:{port}", GATEWAY_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
        for port in self.proxy_ports:
            await wait_http(f"http://127.0.0.1:{port}/")
        if self.redis == "stopped":
            assert self.postgres is not None and self.redis_process is not None
            await self.until_listening(len(self.proxy_ports))
            self.redis_process.kill()
            self.redis_process.wait()

    async def until_listening(self, proxies: int) -> None:
        """Until every proxy holds its LISTEN connection to the store (before Redis goes away)."""
        import asyncpg

        assert self.postgres is not None
        connection = await asyncpg.connect(self.postgres.url())
        try:
            for _ in range(600):
                listening = await connection.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'api-token-gateway-listener'"
                )
                if listening >= proxies:
                    return
                await asyncio.sleep(0.05)
        finally:
            await connection.close()
        raise RuntimeError("the proxies never listened to the store's notifications")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.postgres is not None:
            self.postgres.remove()


async def decision(session: aiohttp.ClientSession, port: int, token: str) -> tuple[int, str | None]:
    async with session.get(f"http://127.0.0.1:{port}/api/bench", headers={"Authorization": f"Bearer {token}"}) as r:
        body = await r.json(content_type=None)
        return r.status, (body.get("code") if r.status >= 400 else None)


async def until(session: aiohttp.ClientSession, port: int, token: str, expected: tuple[int, str | None],
                since: float) -> float:
    for _ in range(20_000):
        if await decision(session, port, token) == expected:
            return (time.perf_counter() - since) * 1000
    raise RuntimeError(f"replica on {port} never answered {expected}")


async def background_traffic(session: aiohttp.ClientSession, ports: list[int], token: str, stop: asyncio.Event,
                             counter: list[int]) -> None:
    while not stop.is_set():
        for port in ports:
            await decision(session, port, token)
            counter[0] += 1


async def run(cycles: int, store: str, redis: str) -> tuple[dict[str, list[float]], list[float], int]:
    with tempfile.TemporaryDirectory(prefix="gateway-propagation-") as directory:
        bench = Bench(Path(directory), store=store, redis=redis)
        try:
            await bench.start()
            return await measure(bench, cycles)
        finally:
            bench.stop()


async def measure(bench: Bench, cycles: int) -> tuple[dict[str, list[float]], list[float], int]:
    admin = f"http://127.0.0.1:{bench.admin_port}"
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    by_change: dict[str, list[float]] = {}
    every: list[float] = []
    counter = [0]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def admin_call(method: str, path: str, json: object = None) -> dict[str, object]:
            async with session.request(method, admin + path, json=json, headers=headers) as response:
                assert response.status < 300, await response.text()
                return await response.json() if response.status != 204 else {}

        async def create() -> tuple[str, str]:
            created = await admin_call("POST", "/v1/tokens", {"name": "bench", "access_level": "read_only"})
            return str(created["id"]), str(created["token"])

        background_id, background_token = await create()
        stop = asyncio.Event()
        traffic = [asyncio.ensure_future(background_traffic(session, bench.proxy_ports, background_token, stop, counter))
                   for _ in range(2)]

        async def change(name: str, method: str, path: str, body: object, token: str,
                         expected: tuple[int, str | None]) -> dict[str, object]:
            reply = await admin_call(method, path, body)
            since = time.perf_counter()
            latencies = await asyncio.gather(*(until(session, port, token, expected, since)
                                               for port in bench.proxy_ports))
            by_change.setdefault(name, []).extend(latencies)
            every.extend(latencies)
            return reply

        token_id, token = await create()
        for _ in range(cycles):
            for port in bench.proxy_ports:  # warm: both replicas hold the token
                assert await decision(session, port, token) == (200, None)
            await change("disable", "POST", f"/v1/tokens/{token_id}/disable", None, token, (401, "token_disabled"))
            await change("enable", "POST", f"/v1/tokens/{token_id}/enable", None, token, (200, None))
            rotated = await change("rotate", "POST", f"/v1/tokens/{token_id}/rotate", {}, token, (401, "invalid_token"))
            token = str(rotated["token"])
            await asyncio.gather(*(until(session, port, token, (200, None), time.perf_counter())
                                   for port in bench.proxy_ports))  # first use of the new secret: argon2
            await change("edit ranges (out)", "PATCH", f"/v1/tokens/{token_id}", {"allowed_ip_ranges": ["10.0.0.0/8"]},
                         token, (403, "ip_not_allowed"))
            await change("edit ranges (in)", "PATCH", f"/v1/tokens/{token_id}", {"allowed_ip_ranges": []},
                         token, (200, None))
            await change("delete", "DELETE", f"/v1/tokens/{token_id}", None, token, (401, "invalid_token"))
            token_id, token = await create()
        stop.set()
        await asyncio.gather(*traffic)
    return by_change, every, counter[0]


def table(
    by_change: dict[str, list[float]], every: list[float], requests: int, wall: float, setup: str
) -> str:
    rows = ["| change | samples | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for name, values in [*by_change.items(), ("all changes, both replicas", every)]:
        rows.append(f"| {name} | {len(values)} | {statistics.median(values):.2f} | "
                    f"{percentile(values, 0.99):.2f} | {max(values):.2f} |")
    changes = len(every) // 2
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    return (
        f"Propagation from the admin API's 2xx to each replica's new decision, {setup} "
        f"({changes} changes x 2 replicas, {requests} background requests, {wall:.0f} s, {machine}).\n\n"
        + "\n".join(rows) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=34, help="each cycle makes 6 changes (default 34: 204)")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--redis", choices=("up", "stopped"), default="up",
                        help="stopped: kill Redis once every process is up (PostgreSQL only: NOTIFY alone)")
    parser.add_argument("--out", help="default bench/results/propagation[-postgresql[-without-redis]].md")
    arguments = parser.parse_args()
    if arguments.redis == "stopped" and arguments.store != "postgresql":
        parser.error("--redis stopped needs --store postgresql: without Redis, only the store's NOTIFY propagates")
    name = "propagation" + ("-postgresql" if arguments.store == "postgresql" else "")
    name += "-without-redis" if arguments.redis == "stopped" else ""
    out = arguments.out or str(Path(__file__).parent / "results" / f"{name}.md")
    setup = {
        ("sqlite", "up"): "SQLite + Redis (cache_ttl 5 s)",
        ("postgresql", "up"): "PostgreSQL + Redis (cache_ttl 60 s)",
        ("postgresql", "stopped"): "PostgreSQL with Redis stopped: NOTIFY only (cache_ttl 60 s)",
    }[(arguments.store, arguments.redis)]
    started = time.monotonic()
    by_change, every, requests = asyncio.run(run(arguments.cycles, arguments.store, arguments.redis))
    report = table(by_change, every, requests, time.monotonic() - started, setup)
    print(report)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(report)


if __name__ == "__main__":
    main()
