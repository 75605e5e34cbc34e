"""Does a token lookup cost the same with 1k and 1M tokens in the store, and does start-up stay flat?

For each size, fills a fresh SQLite store (one transaction of generated rows; 20 of them real tokens with
their own argon2 hashes), then measures: a lookup by id in SQLite itself (the primary-key B-tree, 1,000
random ids, median) and through the gateway's store (the same plus the hop to its database thread); the
gateway's start-up time (`gateway serve` until /healthz answers; the median of three starts); a token's
first request (store read + argon2); and warm requests (the token cache and the memo digest, no store read)
driven by wrk at c=1 over the 20 tokens in turn, with wrk and the gateway on one core so that the figure is
the gateway's and not the scheduler's.

    .venv/bin/python bench/token_scale.py [--sizes 1000 1000000] [--out bench/results/token-scale.md]

Run by hand (it is not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import aiohttp
from load import parse_wrk
from services import need

from gateway.secrets import SecretHasher
from gateway.store import SQLiteStore
from gateway.token_format import issue_token, new_token_id

ADMIN_KEY = "bench-admin-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def fill(path: Path, size: int) -> list[str]:
    """`size` tokens, of which 20 real ones whose token strings are returned."""
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    hasher = SecretHasher()
    real = [issue_token("gw", new_token_id()) for _ in range(20)]
    hashes = [await hasher.hash(token.secret) for token in real]
    hasher.close()
    now = "2026-01-01T00:00:00.000000Z"
    dummy_hash = hashes[0]
    connection = sqlite3.connect(path)
    rows = (
        (token_id, "generated", "read_only", "[]", "enabled", now, now, secret_hash)
        for token_id, secret_hash in [
            *((token.token_id, h) for token, h in zip(real, hashes, strict=True)),
            *((new_token_id(), dummy_hash) for _ in range(size - len(real))),
        ]
    )
    with connection:
        connection.executemany(
            "INSERT INTO tokens (id, name, access_level, allowed_ip_ranges, status, created_at, updated_at,"
            " secret_hash, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)",
            rows,
        )
    connection.close()
    return [str(token) for token in real]


async def store_lookup_us(path: Path, tokens: list[str]) -> tuple[float, float]:
    """Median µs of one lookup by id: in SQLite itself, and through the gateway's store."""
    ids = [token.split("_")[1] for token in tokens]
    connection = sqlite3.connect(path)
    ids += [row[0] for row in connection.execute("SELECT id FROM tokens ORDER BY random() LIMIT 980")]
    random.shuffle(ids)
    direct = []
    for token_id in ids:
        began = time.perf_counter()
        assert connection.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone() is not None
        direct.append(time.perf_counter() - began)
    connection.close()
    store = SQLiteStore(path)
    await store.open()
    through = []
    for token_id in ids:
        began = time.perf_counter()
        assert await store.get_token(token_id) is not None
        through.append(time.perf_counter() - began)
    await store.close()
    return statistics.median(direct) * 1e6, statistics.median(through) * 1e6


def wrk_rotating(path: Path, tokens: list[str]) -> Path:
    """A wrk script sending the tokens in turn, one per request."""
    listed = ", ".join(f'"Bearer {token}"' for token in tokens)
    path.write_text(
        f"local tokens = {{{listed}}}\nlocal i = 0\n"
        "request = function()\n  i = i % #tokens + 1\n"
        '  return wrk.format("GET", nil, {["Authorization"] = tokens[i]})\nend\n'
    )
    return path


def warm_p50_us(process: subprocess.Popen[bytes], url: str, script: Path) -> float:
    """wrk -t1 -c1 for 5 s with wrk and every thread of the gateway on core 0; wrk's p50."""
    threads = [int(task.name) for task in Path(f"/proc/{process.pid}/task").iterdir()]
    everywhere = os.sched_getaffinity(0)
    for thread in threads:
        os.sched_setaffinity(thread, {0})
    try:
        argv = [need("wrk"), "-t1", "-c1", "-d5s", "--latency", "-s", str(script), url]
        output = subprocess.run(
            argv, capture_output=True, text=True, check=True, preexec_fn=lambda: os.sched_setaffinity(0, {0})
        ).stdout
    finally:
        for thread in threads:
            with suppress(OSError):
                os.sched_setaffinity(thread, everywhere)
    result = parse_wrk(output)
    return result.p50_us


async def through_gateway(path: Path, tokens: list[str], *, warm: bool = True) -> tuple[float, float, float]:
    upstream_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_DATABASE_URL=f"sqlite:///{path}",
        GATEWAY_ADMIN_KEY=ADMIN_KEY,
        GATEWAY_ACCESS_LOG="false",
        GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}",
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
    )
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--demo-upstream", f"127.0.0.1:{upstream_port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{admin_port}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.01)
            startup = time.perf_counter() - started
            cold = []
            for token in tokens:
                began = time.perf_counter()
                headers = {"Authorization": f"Bearer {token}"}
                async with session.get(f"http://127.0.0.1:{proxy_port}/api/x", headers=headers) as response:
                    assert response.status == 200, await response.text()
                    await response.read()
                cold.append(time.perf_counter() - began)
        if not warm:
            return startup, statistics.median(cold) * 1000, 0.0
        script = wrk_rotating(path.with_suffix(".lua"), tokens)
        warm_us = warm_p50_us(process, f"http://127.0.0.1:{proxy_port}/api/x", script)
        return startup, statistics.median(cold) * 1000, warm_us
    finally:
        process.terminate()
        process.wait(timeout=30)


async def measure(size: int) -> tuple[float, tuple[float, float], float, float, float]:
    with tempfile.TemporaryDirectory(prefix="gateway-scale-") as directory:
        path = Path(directory) / "gateway.db"
        began = time.perf_counter()
        tokens = await fill(path, size)
        fill_seconds = time.perf_counter() - began
        lookup = await store_lookup_us(path, tokens)
        startup, cold_ms, warm_us = await through_gateway(path, tokens)
        # The first start after the fill also meets a freshly written file: start-up is the median of three.
        startups = [startup, *[(await through_gateway(path, tokens[:1], warm=False))[0] for _ in range(2)]]
        startup = statistics.median(startups)
        return fill_seconds, lookup, startup, cold_ms, warm_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 1_000_000])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "token-scale.md"))
    arguments = parser.parse_args()
    rows = [
        "| tokens in the store | lookup by id in SQLite (µs) | through the store (µs) | start-up (s)"
        " | first request (ms, argon2) | warm request p50 (µs, wrk c=1, one core) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for size in arguments.sizes:
        fill_seconds, (in_sqlite, through_store), startup, cold_ms, warm_us = asyncio.run(measure(size))
        rows.append(
            f"| {size:,} | {in_sqlite:.1f} | {through_store:.0f} | {startup:.2f} | {cold_ms:.1f} | {warm_us:.0f} |"
        )
        print(rows[-1], f"(filled in {fill_seconds:.0f} s)", flush=True)
    report = "\n".join(rows) + f"\n\n{os.cpu_count()} cores, Python {sys.version.split()[0]}.\n"
    print(report)
    Path(arguments.out).write_text(report)


if __name__ == "__main__":
    main()
