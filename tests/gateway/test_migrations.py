"""Schema versions as an operator meets them, with real `gateway` processes on a real SQLite file and a real
PostgreSQL database: `gateway migrate`, a refusal to start on an older or newer schema, and no race when
several processes start on a fresh store at the same moment."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from gateway.store import postgres, sqlite
from tests.conftest import STORE_BACKENDS, Upstream
from tests.redis_server import free_port

both = pytest.mark.parametrize("store_backend", STORE_BACKENDS, indirect=True)
on_postgres = pytest.mark.parametrize("store_backend", ["postgresql"], indirect=True)


def _environment(database_url: str, **extra: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    environment.update(
        GATEWAY_DATABASE_URL=database_url,
        GATEWAY_ARGON2_TIME_COST="1",
        GATEWAY_ARGON2_MEMORY_COST_KIB="1024",
        GATEWAY_ADMIN_KEY="migration-test-admin-key-0123",
        **extra,
    )
    return environment


async def _run_to_exit(database_url: str, *arguments: str, **environment: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *arguments,
        env=_environment(database_url, **environment),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, stderr.decode()


async def _set_version(database_url: str, version: int) -> None:
    if database_url.startswith("sqlite:///"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as connection:
            connection.execute(f"PRAGMA user_version = {version}")
        connection.close()
        return
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("UPDATE schema_version SET version = $1", version)
    finally:
        await connection.close()


@both
async def test_migrate_creates_the_schema_once_and_then_has_nothing_to_do(database_url: str) -> None:
    newest = len(sqlite.MIGRATIONS if database_url.startswith("sqlite") else postgres.MIGRATIONS)
    code, stderr = await _run_to_exit(database_url, "migrate")
    assert (code, stderr.strip()) == (0, f"gateway: upgraded the store's schema from version 0 to {newest}")
    code, stderr = await _run_to_exit(database_url, "migrate")
    assert code == 0 and "nothing to do" in stderr


@on_postgres
async def test_a_process_on_an_older_postgres_schema_says_to_run_migrate(database_url: str) -> None:
    code, stderr = await _run_to_exit(database_url, "serve", GATEWAY_UPSTREAM="http://127.0.0.1:9")
    assert code == 1 and stderr.strip().count("\n") == 0, stderr
    assert "schema version 0, older than this gateway's" in stderr and "gateway migrate" in stderr
    assert "test-postgres-password" not in stderr


@both
async def test_a_newer_schema_stops_start_up_with_one_line(database_url: str) -> None:
    code, _ = await _run_to_exit(database_url, "migrate")
    assert code == 0
    await _set_version(database_url, 99)
    code, stderr = await _run_to_exit(database_url, "serve", GATEWAY_UPSTREAM="http://127.0.0.1:9")
    assert code == 1 and stderr.strip().count("\n") == 0, stderr
    assert "schema version 99, newer than this gateway knows" in stderr and "upgrade the gateway" in stderr
    code, stderr = await _run_to_exit(database_url, "migrate")
    assert code == 1 and "newer than this gateway knows" in stderr


@both
async def test_three_processes_starting_together_on_a_fresh_store_all_come_up(
    database_url: str, upstream: Upstream
) -> None:
    """SQLite upgrades itself on start under BEGIN IMMEDIATE; PostgreSQL with --migrate under an advisory lock."""
    ports = [(free_port(), free_port()) for _ in range(3)]
    extra = ["--migrate"] if database_url.startswith("postgres") else []
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", *extra,
            env=_environment(
                database_url,
                GATEWAY_UPSTREAM=upstream.url,
                GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy}",
                GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin}",
            ),
            stderr=asyncio.subprocess.PIPE,
        )
        for proxy, admin in ports
    ]
    try:
        async with aiohttp.ClientSession() as session:
            for process, (_, admin) in zip(processes, ports, strict=True):
                for _ in range(1200):
                    assert process.returncode is None, await process.stderr.read()  # type: ignore[union-attr]
                    try:
                        async with session.get(f"http://127.0.0.1:{admin}/readyz") as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)
                else:
                    raise AssertionError("a gateway never became ready")
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        outputs = [(await asyncio.wait_for(process.stderr.read(), timeout=30)).decode() for process in processes]  # type: ignore[union-attr]
        for process in processes:
            await process.wait()
    assert not any("already exists" in output for output in outputs), outputs


@on_postgres
async def test_listing_tokens_unused_since_can_read_an_index_rather_than_every_token(database_url: str) -> None:
    """At a million tokens, a walk by seq that filters on last use reads every row when few match; the planner
    needs an index on last use to choose instead. (SQLite's planner keeps its rowid walk for ORDER BY seq
    LIMIT n whatever the indexes, so only PostgreSQL has one.)"""
    code, stderr = await _run_to_exit(database_url, "migrate")
    assert code == 0, stderr
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO tokens (id, name, access_level, allowed_ip_ranges, status, created_at, updated_at,"
            " last_used_at, secret_hash, version)"
            " SELECT 'id' || i, 'n', 'read_only', '{}', 'enabled', now(), now(),"
            " CASE WHEN i % 1000 = 0 THEN NULL ELSE now() END, 'hash', 1 FROM generate_series(1, 20000) i"
        )
        await connection.execute("ANALYZE tokens")
        plan = await connection.fetchval(
            "EXPLAIN (FORMAT JSON) SELECT seq FROM tokens"
            " WHERE (last_used_at IS NULL OR last_used_at < now() - interval '1 day') ORDER BY seq DESC LIMIT 101"
        )
    finally:
        await connection.close()
    assert "tokens_last_used" in plan
