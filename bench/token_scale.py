"""Does a token lookup cost the same with 1k and 1M tokens in the store, and does start-up stay flat?

For each size, fills a fresh SQLite store (one transaction of generated rows; 20 of them real tokens with
their own argon2 hashes), then measures: a lookup by id in SQLite itself (the primary-key B-tree, 1,000
random ids, median) and through the gateway's store (the same plus the hop to its database thread); the
gateway's start-up time (`gateway serve` until /healthz answers; the median of three starts); a token's
first request (store read + argon2); and warm requests (the token cache and the memo digest, no store read)
driven by wrk at c=1 over the 20 tokens in turn, with wrk and the gateway on one core so that the figure is
the gateway's and not the scheduler's.

    .venv/bin/python bench/token_scale.py [--sizes 1000 1000000] [--out bench/results/token-scale.md]
    .venv/bin/python bench/token_scale.py --store postgresql [--sizes 1000000]
                                          [--out bench/results/token-scale-postgresql.md]

With `--store postgresql`, each size is filled by COPY into a PostgreSQL server of its own (initdb into a
temporary directory, as the test suite does; one in ten tokens disabled, half never used), and it measures
what grows with the table there: a lookup by id through the gateway's store (1,000 random ids, p50 and p99),
`GET /v1/tokens` through the admin API for its first page and for a page half-way down the table, with each
filter (20 requests each, p50 and p99), creates per second through the admin API (argon2id hashing with the
default parameters included), the start-up time of `gateway serve` (median of three) and a token's first
request through the proxy (store read and argon2). Warm requests never reach the store, so they are the
SQLite figures.

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
from collections.abc import Iterator
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from load import parse_wrk
from services import need

from gateway.secrets import SecretHasher
from gateway.store import SQLiteStore
from gateway.token_format import issue_token, new_token_id

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/postgres_server.py
from tests.postgres_server import PostgresServer  # noqa: E402

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


# --- PostgreSQL (--store postgresql) ---------------------------------------------------------------------

UNUSED_SINCE = "2026-11-01T00:00:00Z"
LIST_FILTERS: tuple[tuple[str, dict[str, str]], ...] = (
    ("no filter", {}),
    ("status=disabled", {"status": "disabled"}),
    ("unused_since", {"unused_since": UNUSED_SINCE}),
    ("status=enabled&unused_since", {"status": "enabled", "unused_since": UNUSED_SINCE}),
)
_COPY_COLUMNS = [
    "id", "name", "access_level", "allowed_ip_ranges", "status", "expires_at", "created_at", "updated_at",
    "rotated_at", "last_used_at", "last_used_ip", "secret_hash", "previous_secret_hash",
    "previous_secret_expires_at", "version",
]


def p50_p99(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


async def fill_postgres(url: str, size: int) -> list[str]:
    """`size` tokens by COPY (the 20 real ones enabled, shuffled in); returns the real token strings."""
    import asyncpg

    from gateway.settings import Secret
    from gateway.store.postgres import PostgresStore

    store = PostgresStore(Secret(url), migrate=True)
    await store.open()
    await store.close()
    hasher = SecretHasher()
    real = [issue_token("gw", new_token_id()) for _ in range(20)]
    hashes = [await hasher.hash(token.secret) for token in real]
    hasher.close()
    now = datetime.now(UTC)
    positions = set(random.sample(range(size), len(real)))

    def rows() -> Iterator[tuple[object, ...]]:
        tokens = iter(zip(real, hashes, strict=True))
        for n in range(size):
            if n in positions:
                token, secret_hash = next(tokens)
                token_id, status = token.token_id, "enabled"
            else:
                token_id, secret_hash = new_token_id(), hashes[0]
                status = "disabled" if n % 10 == 9 else "enabled"
            used = None if n % 2 == 0 else now - timedelta(seconds=n % (90 * 86400))
            yield (
                token_id, "generated", "read_only", [], status, None, now, now, None, used,
                "10.0.0.1" if used is not None else None, secret_hash, None, None, 1,
            )

    connection = await asyncpg.connect(url)
    try:
        await connection.copy_records_to_table("tokens", records=rows(), columns=_COPY_COLUMNS)
        await connection.execute("VACUUM ANALYZE tokens")
    finally:
        await connection.close()
    return [str(token) for token in real]


async def postgres_lookup_us(url: str) -> tuple[float, float]:
    """p50 and p99 µs of one lookup by id through the gateway's store, over 1,000 random ids."""
    import asyncpg

    from gateway.settings import Secret
    from gateway.store.postgres import PostgresStore

    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch("SELECT id FROM tokens ORDER BY random() LIMIT 1000")
        ids = [row["id"] for row in rows]
    finally:
        await connection.close()
    random.shuffle(ids)
    store = PostgresStore(Secret(url))
    await store.open()
    try:
        took = []
        for token_id in ids:
            began = time.perf_counter()
            assert await store.get_token(token_id) is not None
            took.append(time.perf_counter() - began)
    finally:
        await store.close()
    p50, p99 = p50_p99(took)
    return p50 * 1e6, p99 * 1e6


async def admin_figures(
    url: str, tokens: list[str], size: int
) -> tuple[float, float, float, dict[str, tuple[float, float, float, float]], float]:
    """Through one `gateway serve` on PostgreSQL: start-up (median of three), a first request's p50,
    listing latencies per filter (first page, page half-way down), creates per second."""
    from gateway.store.cursors import encode_cursor

    upstream_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_DATABASE_URL=url,
        GATEWAY_ADMIN_KEY=ADMIN_KEY,
        GATEWAY_ACCESS_LOG="false",
        GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}",
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
    )
    admin = f"http://127.0.0.1:{admin_port}"
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    startups = []
    async with aiohttp.ClientSession() as session:
        for attempt in range(3):
            started = time.perf_counter()
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--demo-upstream", f"127.0.0.1:{upstream_port}"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            while True:
                try:
                    async with session.get(f"{admin}/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.01)
            startups.append(time.perf_counter() - started)
            if attempt < 2:
                process.terminate()
                process.wait(timeout=30)
        try:
            cold = []
            for token in tokens:
                began = time.perf_counter()
                async with session.get(
                    f"http://127.0.0.1:{proxy_port}/api/x", headers={"Authorization": f"Bearer {token}"}
                ) as response:
                    assert response.status == 200, await response.text()
                    await response.read()
                cold.append(time.perf_counter() - began)
            listing: dict[str, tuple[float, float, float, float]] = {}
            halfway = encode_cursor(size // 2)
            for name, query in LIST_FILTERS:
                first, later = [], []
                for _ in range(20):
                    for cursor, into in ((None, first), (halfway, later)):
                        params = {**query, "limit": "100", **({"cursor": cursor} if cursor else {})}
                        began = time.perf_counter()
                        listed = session.get(f"{admin}/v1/tokens", params=params, headers=headers)
                        async with listed as response:
                            assert response.status == 200, await response.text()
                            assert len((await response.json())["items"]) == 100
                        into.append(time.perf_counter() - began)
                listing[name] = (*(x * 1000 for x in p50_p99(first)), *(x * 1000 for x in p50_p99(later)))
            creates = 200
            began = time.perf_counter()
            pending = iter(range(creates))

            async def creator() -> None:
                for n in pending:
                    body = {"name": f"bench {n}", "access_level": "read_only"}
                    async with session.post(f"{admin}/v1/tokens", json=body, headers=headers) as response:
                        assert response.status == 201, await response.text()

            await asyncio.gather(*(creator() for _ in range(8)))
            per_second = creates / (time.perf_counter() - began)
        finally:
            process.terminate()
            process.wait(timeout=30)
    return statistics.median(startups), statistics.median(cold) * 1000, 0.0, listing, per_second


async def measure_postgres(size: int) -> str:
    with tempfile.TemporaryDirectory(prefix="gateway-scale-pg-"):
        server = PostgresServer()
        try:
            server.initialise()
            server.start()
            url = server.url()
            began = time.perf_counter()
            tokens = await fill_postgres(url, size)
            fill_seconds = time.perf_counter() - began
            lookup_p50, lookup_p99 = await postgres_lookup_us(url)
            startup, cold_ms, _, listing, per_second = await admin_figures(url, tokens, size)
        finally:
            server.remove()
    lines = [
        f"#### {size:,} tokens in PostgreSQL (filled by COPY in {fill_seconds:.0f} s)",
        "",
        f"- lookup by id through the store: p50 {lookup_p50:.0f} µs, p99 {lookup_p99:.0f} µs"
        " (1,000 random ids)",
        f"- a token's first request through the proxy (store read + argon2id): p50 {cold_ms:.1f} ms",
        f"- creates through the admin API (8 at a time, argon2id included): {per_second:.0f} per second",
        f"- start-up of `gateway serve` until /readyz answers: {startup:.2f} s (median of three)",
        "",
        "| `GET /v1/tokens?limit=100` | first page p50 ms | p99 ms | page half-way down p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} |" for name, (a, b, c, d) in listing.items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="default: 1000 1000000 (SQLite), 1000000 (PostgreSQL)"
    )
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--out", help="default bench/results/token-scale[-postgresql].md")
    arguments = parser.parse_args()
    results = Path(__file__).parent / "results"
    if arguments.store == "postgresql":
        sections = []
        for size in arguments.sizes or [1_000_000]:
            sections.append(asyncio.run(measure_postgres(size)))
            print(sections[-1], flush=True)
        report = "\n".join(sections) + f"\n{os.cpu_count()} cores, Python {sys.version.split()[0]}.\n"
        Path(arguments.out or results / "token-scale-postgresql.md").write_text(report)
        return
    arguments.sizes = arguments.sizes or [1_000, 1_000_000]
    arguments.out = arguments.out or str(results / "token-scale.md")
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
