"""Does a token lookup cost the same with 1k and 1M tokens in the store, and does start-up stay flat?

For each size, fills a fresh SQLite store (one transaction of generated rows; 20 of them real tokens with
their own argon2 hashes), then measures: the store's lookup by id (in process, random ids), the gateway's
start-up time (`gateway serve` until /healthz answers), a token's first request (store read + argon2) and
its warm requests (memo, no store read).

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
from pathlib import Path

import aiohttp

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


async def store_lookup_us(path: Path, tokens: list[str]) -> float:
    store = SQLiteStore(path)
    await store.open()
    ids = [token.split("_")[1] for token in tokens]
    connection = sqlite3.connect(path)
    ids += [row[0] for row in connection.execute("SELECT id FROM tokens ORDER BY random() LIMIT 980")]
    connection.close()
    random.shuffle(ids)
    started = time.perf_counter()
    for token_id in ids:
        assert await store.get_token(token_id) is not None
    elapsed = time.perf_counter() - started
    await store.close()
    return elapsed / len(ids) * 1e6


async def through_gateway(path: Path, tokens: list[str]) -> tuple[float, float, float]:
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
            cold, warm = [], []
            for token in tokens:
                headers = {"Authorization": f"Bearer {token}"}
                for sample in (cold, warm, warm, warm, warm, warm):
                    began = time.perf_counter()
                    async with session.get(f"http://127.0.0.1:{proxy_port}/api/x", headers=headers) as response:
                        assert response.status == 200, await response.text()
                        await response.read()
                    sample.append(time.perf_counter() - began)
        return startup, statistics.median(cold) * 1000, statistics.median(warm) * 1e6
    finally:
        process.terminate()
        process.wait(timeout=30)


async def measure(size: int) -> tuple[float, float, float, float, float]:
    with tempfile.TemporaryDirectory(prefix="gateway-scale-") as directory:
        path = Path(directory) / "gateway.db"
        began = time.perf_counter()
        tokens = await fill(path, size)
        fill_seconds = time.perf_counter() - began
        lookup = await store_lookup_us(path, tokens)
        startup, cold_ms, warm_us = await through_gateway(path, tokens)
        return fill_seconds, lookup, startup, cold_ms, warm_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 1_000_000])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "token-scale.md"))
    arguments = parser.parse_args()
    rows = [
        "| tokens in the store | store lookup by id (µs) | start-up (s) | first request (ms, argon2) |"
        " warm request (µs, client-side) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for size in arguments.sizes:
        fill_seconds, lookup, startup, cold_ms, warm_us = asyncio.run(measure(size))
        rows.append(f"| {size:,} | {lookup:.0f} | {startup:.2f} | {cold_ms:.1f} | {warm_us:.0f} |")
        print(rows[-1], f"(filled in {fill_seconds:.0f} s)", flush=True)
    report = "\n".join(rows) + f"\n\n{os.cpu_count()} cores, Python {sys.version.split()[0]}.\n"
    print(report)
    Path(arguments.out).write_text(report)


if __name__ == "__main__":
    main()
