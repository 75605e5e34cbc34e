"""Are per-token limits exact across replicas, and what do they cost?

Starts a real redis-server, one `gateway admin` and two `gateway proxy` processes (the setup of
propagation.py, with the access log on as by default), then:

1. Accuracy: for each multiple k (default 2, 5, 10), a fresh token limited to N requests per W seconds is
   driven through both replicas, alternately, at k times its rate for `--duration` seconds (open loop: a
   request every 1 / (k N / W) seconds, whatever the answers). GCRA admits the burst (N) plus one request per
   W / N seconds of the run, so the expected count is N + span x N / W, span being the time from the first
   to the last request sent. A limit of `--busy` requests per W seconds is driven the same way at x2: each
   replica then sees far more than 64 requests a second, so it leases shares of the budget until the budget
   is nearly spent (the row counts the requests served from leases, from each proxy's /metrics). A quota (N
   in total) driven the same way must admit exactly N.
2. Cost: wrk (c=32, 2 threads) against one replica with an unlimited token, then with a token limited to
   100 000 per second (never refused): with the defaults (the replica leases shares of the budget,
   leases.py), and against a third `gateway proxy` with `limit_leases = false` (every request runs the Redis
   script); requests per second of each, `--rounds` times, median, with the CPU time per request of the proxy
   process and of redis-server (both share the machine's cores with wrk and the upstream, so both weigh on
   the rate).

    .venv/bin/python bench/ratelimit.py [--requests 100] [--window 10] [--multiples 2 5 10] [--busy 2000]
                                        [--duration 20] [--cost-seconds 10] [--rounds 3]
                                        [--out bench/results/ratelimit.md]

Run it on a quiet machine (the figures in the README come from there); `--duration 2 --cost-seconds 2
--rounds 1` is a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from load import wrk, wrk_script
from propagation import ADMIN_KEY, Bench, free_port, wait_http


async def admin_call(
    session: aiohttp.ClientSession, bench: Bench, method: str, path: str, body: object
) -> dict:  # type: ignore[type-arg]
    url = f"http://127.0.0.1:{bench.admin_port}{path}"
    async with session.request(
        method, url, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as reply:
        assert reply.status < 300, await reply.text()
        return dict(await reply.json())


async def drive(
    session: aiohttp.ClientSession, ports: list[int], token: str, rate: float, seconds: float, settle: float
) -> tuple[int, int, int, float]:
    """Open-loop traffic at `rate` per second over both replicas, after one request per replica and `settle`
    seconds: (admitted, refused with 429, other answers, seconds from the first open-loop request to the
    last)."""
    counts = {"ok": 0, "limited": 0, "other": 0}
    headers = {"Authorization": f"Bearer {token}"}

    async def one(port: int) -> None:
        try:
            async with session.get(f"http://127.0.0.1:{port}/api/bench", headers=headers) as reply:
                await reply.read()
                key = "ok" if reply.status == 200 else "limited" if reply.status == 429 else "other"
        except aiohttp.ClientError:
            key = "other"
        counts[key] += 1

    # One request per replica first: a token's first use costs argon2 on each. Then wait until the budget is
    # whole again, so that the open loop starts from exactly `burst` requests.
    for port in ports:
        await one(port)
    await asyncio.sleep(settle)
    tasks = []
    total = max(1, int(rate * seconds))
    started = time.perf_counter()
    last = started
    for n in range(total):
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        last = time.perf_counter()
        tasks.append(asyncio.ensure_future(one(ports[n % len(ports)])))
    await asyncio.gather(*tasks)
    return counts["ok"], counts["limited"], counts["other"], last - started


async def accuracy(bench: Bench, arguments: argparse.Namespace) -> list[str]:
    rows = [
        "| limit | driven at | sent | admitted | expected | admitted / expected | other answers |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    requests, window = arguments.requests, arguments.window
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for multiple in arguments.multiples:
            created = await admin_call(
                session,
                bench,
                "POST",
                "/v1/tokens",
                {
                    "name": f"bench x{multiple}",
                    "access_level": "read_only",
                    "rate_limit": {"requests": requests, "per_seconds": window},
                },
            )
            rate = multiple * requests / window
            ok, limited, other, span = await drive(
                session, bench.proxy_ports, str(created["token"]), rate, arguments.duration, settle=window
            )
            sent = ok + limited + other
            warm = len(bench.proxy_ports)
            expected = min(sent, warm + requests + span * requests / window)
            rows.append(
                f"| {requests} / {window} s | x{multiple:g} ({rate:g}/s) | {sent} | {ok} |"
                f" {expected:.1f} | {ok / expected:.2%} | {other} |"
            )
        if arguments.busy:
            # A limit high enough for leases (leases.py): 2 replicas at twice its rate are each far above
            # 64 requests a second, and its budget leaves shares to lease until it is nearly spent.
            busy = arguments.busy
            created = await admin_call(
                session,
                bench,
                "POST",
                "/v1/tokens",
                {
                    "name": "bench busy",
                    "access_level": "read_only",
                    "rate_limit": {"requests": busy, "per_seconds": window},
                },
            )
            leased_before = await leased_checks(session, bench)
            rate = 2 * busy / window
            ok, limited, other, span = await drive(
                session, bench.proxy_ports, str(created["token"]), rate, arguments.duration, settle=window
            )
            leased = await leased_checks(session, bench) - leased_before
            sent = ok + limited + other
            expected = min(sent, len(bench.proxy_ports) + busy + span * busy / window)
            rows.append(
                f"| {busy} / {window} s (leases: {leased} of {ok} admitted) | x2 ({rate:g}/s) | {sent} | {ok} |"
                f" {expected:.1f} | {ok / expected:.2%} | {other} |"
            )
        created = await admin_call(
            session,
            bench,
            "POST",
            "/v1/tokens",
            {
                "name": "bench quota",
                "access_level": "read_only",
                "quota": {"requests": requests, "period": "total"},
            },
        )
        ok, limited, other, _ = await drive(
            session, bench.proxy_ports, str(created["token"]), 10 * requests / window, arguments.duration, 0
        )
        rows.append(
            f"| {requests} in total (quota) | x10 | {ok + limited + other} | {ok} | {requests} |"
            f" {ok / requests:.2%} | {other} |"
        )
    return rows


async def leased_checks(session: aiohttp.ClientSession, bench: Bench) -> int:
    """Requests both replicas served from leases so far (gateway_rate_limit_checks_total{counted="lease"})."""
    total = 0
    for port in bench.metrics_ports:
        url = f"http://127.0.0.1:{port}/metrics"
        async with session.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as reply:
            for line in (await reply.text()).splitlines():
                if line.startswith('gateway_rate_limit_checks_total{counted="lease"}'):
                    total += int(float(line.rsplit(" ", 1)[1]))
    return total


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far, from /proc (work done, whatever else the machine runs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cost(bench: Bench, arguments: argparse.Namespace, workdir: Path) -> list[str]:
    wrk_binary = shutil.which("wrk")
    if wrk_binary is None:
        return ["wrk is not installed (bench/run installs it): no cost figures."]
    async with aiohttp.ClientSession() as session:
        plain = await admin_call(
            session, bench, "POST", "/v1/tokens", {"name": "unlimited", "access_level": "read_only"}
        )
        limited = await admin_call(
            session,
            bench,
            "POST",
            "/v1/tokens",
            {
                "name": "limited",
                "access_level": "read_only",
                "rate_limit": {"requests": 100_000, "per_seconds": 1},
            },
        )
    exact_port = free_port()  # one more replica, with every request checked in Redis
    bench.spawn(
        [sys.executable, "-m", "gateway", "proxy"],
        **bench.environment,
        GATEWAY_PROXY_LISTEN=f"127.0.0.1:{exact_port}",
        GATEWAY_LIMIT_LEASES="false",
    )
    exact_pid = bench.processes[-1].pid
    await wait_http(f"http://127.0.0.1:{exact_port}/")
    first_pid = bench.processes[-3].pid  # the first `gateway proxy` (bench.proxy_ports[0])
    assert bench.redis_process is not None
    redis_pid = bench.redis_process.pid
    log = workdir / "wrk.log"
    runs = {  # name: (token, port, proxy pid)
        "unlimited": (plain, bench.proxy_ports[0], first_pid),
        "limited": (limited, bench.proxy_ports[0], first_pid),
        "limited, leases off": (limited, exact_port, exact_pid),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}  # microseconds of the proxy per request
    redis_cpu: dict[str, list[float]] = {name: [] for name in runs}  # and of redis-server
    for _ in range(arguments.rounds):
        for name, (created, port, pid) in runs.items():
            url = f"http://127.0.0.1:{port}/api/bench"
            script = wrk_script(workdir, name.replace(",", "").replace(" ", "-"), f"Bearer {created['token']}")
            await wrk(wrk_binary, url, script, 32, 2, log)  # warm-up: connections, the argon2 memo
            before, redis_before = cpu_seconds(pid), cpu_seconds(redis_pid)
            result = await wrk(wrk_binary, url, script, 32, arguments.cost_seconds, log)
            cpu[name].append((cpu_seconds(pid) - before) / result.requests * 1e6)
            redis_cpu[name].append((cpu_seconds(redis_pid) - redis_before) / result.requests * 1e6)
            rates[name].append(result.rate)
    labels = {
        "unlimited": "unlimited",
        "limited": "rate_limit 100000/1s, the defaults (leased)",
        "limited, leases off": "rate_limit 100000/1s, `limit_leases = false` (every request checked in Redis)",
    }
    rows = [
        (
            "| token | requests/s (median of rounds) | proxy CPU per request | redis-server CPU per request |"
            " rounds (requests/s) |"
        ),
        "|---|---:|---:|---:|---|",
    ]
    for name, label in labels.items():
        rows.append(
            f"| {label} | {statistics.median(rates[name]):,.0f} | {statistics.median(cpu[name]):.1f} µs |"
            f" {statistics.median(redis_cpu[name]):.1f} µs | {', '.join(f'{r:,.0f}' for r in rates[name])} |"
        )
    unlimited = statistics.median(rates["unlimited"])
    unlimited_cpu = statistics.median(cpu["unlimited"])
    rows.append("")
    for name in ("limited", "limited, leases off"):
        rows.append(
            f"{labels[name]} against unlimited: {statistics.median(rates[name]) / unlimited - 1:+.1%} requests"
            f" per second, {statistics.median(cpu[name]) / unlimited_cpu - 1:+.1%} CPU per request in the proxy"
            " process."
        )
        rows.append("")
    return rows[:-1]


async def run(arguments: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="gateway-ratelimit-") as directory:
        bench = Bench(Path(directory), access_log=True)  # the defaults: each request logged
        try:
            await bench.start()
            rows = await accuracy(bench, arguments)
            costs = await cost(bench, arguments, Path(directory))
        finally:
            bench.stop()
    return "\n".join(
        [
            "# Per-token limits across two replicas",
            "",
            (
                f"`{' '.join(['bench/ratelimit.py', *sys.argv[1:]])}` on {platform.node()}, Python"
                f" {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
            ),
            "",
            "## Accuracy (two `gateway proxy` processes, one Redis)",
            "",
            *rows,
            "",
            "## Cost with Redis (wrk -t2 -c32 against one replica)",
            "",
            *costs,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100, help="N: the limit's requests (default 100)")
    parser.add_argument("--window", type=int, default=10, help="W: its per_seconds (default 10)")
    parser.add_argument("--multiples", type=float, nargs="+", default=[2, 5, 10])
    parser.add_argument(
        "--busy", type=int, default=2000, help="requests per window of a limit driven at x2 with leases (0: none)"
    )
    parser.add_argument("--duration", type=float, default=20, help="seconds of traffic per multiple")
    parser.add_argument("--cost-seconds", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ratelimit.md"))
    arguments = parser.parse_args()
    report = asyncio.run(run(arguments))
    print(report)
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(report)


if __name__ == "__main__":
    main()
