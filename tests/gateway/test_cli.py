"""`gateway serve` as an operator runs it: start-up errors, the generated admin key, and SIGTERM draining."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from gateway.cli import FLAG_SETTINGS, build_parser
from gateway.settings import _CASTS, env_name
from tests.conftest import Upstream

Serve = Callable[..., Awaitable[asyncio.subprocess.Process]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    environment.update(
        {
            "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
            "GATEWAY_ARGON2_TIME_COST": "1",
            "GATEWAY_ARGON2_MEMORY_COST_KIB": "1024",
            **extra,
        }
    )
    return environment


async def _run_to_exit(tmp_path: Path, *arguments: str, **environment: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *arguments,
        env=_environment(tmp_path, **environment),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    return process.returncode or 0, stderr.decode()


def test_every_flag_of_every_subcommand_is_described_and_names_its_environment_variable() -> None:
    commands = next(
        action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)
    )
    assert set(commands.choices) >= {"serve", "proxy", "admin"}
    for command, parser in commands.choices.items():
        if command in ("tokens", "admin-keys"):
            continue  # the admin commands, which have their own flags: tests/admin_cli
        flags = [action for action in parser._actions if action.option_strings and action.dest != "help"]
        assert flags, command
        for action in flags:
            assert action.help and len(action.help) > 20, (command, action.option_strings)
            if action.dest in _CASTS:
                assert env_name(action.dest) in action.help, (command, action.option_strings)
        for name in FLAG_SETTINGS:
            assert any(action.dest == name for action in flags), (command, name)


async def test_serve_help_lists_the_flags_with_their_environment_variables(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--help",
        env=_environment(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    text = " ".join(stdout.decode().split())  # argparse wraps lines
    assert process.returncode == 0
    for flag, variable in (("--upstream", "GATEWAY_UPSTREAM"), ("--redis-url", "GATEWAY_REDIS_URL")):
        assert flag in text and variable in text
    assert "default 0.0.0.0:8080" in text


async def test_missing_upstream_stops_start_up_with_one_clear_line(tmp_path: Path) -> None:
    code, stderr = await _run_to_exit(tmp_path, "serve")
    assert code == 2
    assert stderr.strip().count("\n") == 0
    assert "'upstream' is missing" in stderr and "GATEWAY_UPSTREAM" in stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEWAY_UPSTREAM", "ftp://example"),
        ("GATEWAY_PROXY_LISTEN", "nowhere"),
        ("GATEWAY_TRUSTED_PROXIES", "10.0.0.0/33"),
        ("GATEWAY_ADMIN_KEY", "short"),
        ("GATEWAY_UPSTREAM_TIMEOUT", "-1"),
        ("GATEWAY_DATABASE_URL", "mysql://x"),
        ("GATEWAY_DATABASE_URL", "postgres:///tokens"),
        ("GATEWAY_DATABASE_POOL_SIZE", "0"),
    ],
)
async def test_bad_setting_stops_start_up_naming_it(tmp_path: Path, variable: str, value: str) -> None:
    environment = {"GATEWAY_UPSTREAM": "http://127.0.0.1:9", variable: value}
    code, stderr = await _run_to_exit(tmp_path, "serve", **environment)
    assert code == 2
    assert stderr.startswith("gateway: setting ") and variable in stderr
    assert stderr.strip().count("\n") == 0


async def test_admin_api_beyond_loopback_without_tls_refuses_to_start(tmp_path: Path) -> None:
    environment = {"GATEWAY_UPSTREAM": "http://127.0.0.1:9", "GATEWAY_ADMIN_LISTEN": "0.0.0.0:18081"}
    code, stderr = await _run_to_exit(tmp_path, "serve", **environment)
    assert code == 2 and stderr.strip().count("\n") == 0
    assert "beyond loopback, without TLS" in stderr and "GATEWAY_ADMIN_ALLOW_REMOTE" in stderr


async def test_bad_config_file_stops_start_up_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('upstream = "http://127.0.0.1:9"\nproxy_lisen = "0.0.0.0:1"\n')
    code, stderr = await _run_to_exit(tmp_path, "serve", "--config", str(config))
    assert code == 2 and "unknown setting 'proxy_lisen'" in stderr


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    processes: list[asyncio.subprocess.Process] = []

    async def start(upstream: str, **environment: str) -> asyncio.subprocess.Process:
        proxy, admin = _free_port(), _free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve",
            env=_environment(
                tmp_path,
                GATEWAY_UPSTREAM=upstream,
                GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy}",
                GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin}",
                **environment,
            ),
            stderr=asyncio.subprocess.PIPE,
        )
        processes.append(process)
        process.proxy_url = f"http://127.0.0.1:{proxy}"  # type: ignore[attr-defined]
        process.admin_url = f"http://127.0.0.1:{admin}"  # type: ignore[attr-defined]
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"{process.admin_url}/healthz") as response:  # type: ignore[attr-defined]
                        if response.status == 200:
                            return process
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
        raise AssertionError("gateway serve did not become healthy")

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _stderr_until_exit(process: asyncio.subprocess.Process) -> str:
    assert process.stderr is not None
    return (await asyncio.wait_for(process.stderr.read(), timeout=30)).decode()


async def test_first_start_prints_a_generated_admin_key_once_and_it_keeps_working(
    serve: Serve, upstream: Upstream
) -> None:
    first = await serve(upstream.url)
    first.send_signal(signal.SIGTERM)
    output = await _stderr_until_exit(first)
    keys = [word for word in output.split() if word.startswith("gwadm_")]
    assert len(keys) == 1
    assert await first.wait() == 0

    second = await serve(upstream.url)
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {keys[0]}"}
        async with session.get(f"{second.admin_url}/v1/tokens", headers=headers) as response:  # type: ignore[attr-defined]
            assert response.status == 200
    second.send_signal(signal.SIGTERM)
    assert "gwadm_" not in await _stderr_until_exit(second)


async def _proxy_refuses_connections(url: str) -> bool:
    host, _, port = url.removeprefix("http://").partition(":")
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return True
    writer.close()
    return False


async def test_sigterm_drains_in_flight_requests_then_exits_0(serve: Serve, upstream: Upstream) -> None:
    admin_key = "cli-test-admin-key-0123456789"
    process = await serve(upstream.url, GATEWAY_ADMIN_KEY=admin_key)
    assert process.stderr is not None
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{process.admin_url}/v1/tokens",  # type: ignore[attr-defined]
            json={"name": "drain", "access_level": "read_only"},
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as response:
            token = (await response.json())["token"]
        in_flight = asyncio.ensure_future(
            session.get(f"{process.proxy_url}/held", headers={"Authorization": f"Bearer {token}"})  # type: ignore[attr-defined]
        )
        await asyncio.wait_for(upstream.held.wait(), timeout=10)  # the request is at the upstream, unanswered

        process.send_signal(signal.SIGTERM)
        output = b""
        while b"stopping: draining" not in output:
            line = await asyncio.wait_for(process.stderr.readline(), timeout=10)
            assert line, output.decode()
            output += line
        for _ in range(500):  # the proxy stops listening: the drain has begun
            if await _proxy_refuses_connections(process.proxy_url):  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the proxy kept listening after SIGTERM")
        assert not in_flight.done()
        assert process.returncode is None
        upstream.release.set()

        response = await asyncio.wait_for(in_flight, timeout=10)
        assert response.status == 200
        assert await response.json() == {"held": True}
    output += (await _stderr_until_exit(process)).encode()
    assert await process.wait() == 0
    assert b"stopped" in output
    assert [request["raw_path"] for request in upstream.requests] == ["/held"]
    assert admin_key.encode() not in output and token.encode() not in output


@pytest.mark.parametrize("command", ["proxy", "admin"])
async def test_separate_planes_on_sqlite_without_redis_refuse_to_start(tmp_path: Path, command: str) -> None:
    code, stderr = await _run_to_exit(tmp_path, command, GATEWAY_UPSTREAM="http://127.0.0.1:9")
    assert code == 2
    assert "GATEWAY_REDIS_URL" in stderr and stderr.strip().count("\n") == 0


@pytest.mark.parametrize("store_backend", ["sqlite", "postgresql"], indirect=True)
async def test_admin_process_and_two_proxy_workers_share_the_store_and_hear_of_changes(
    tmp_path: Path, upstream: Upstream, store_backend: str, database_url: str, request: pytest.FixtureRequest
) -> None:
    """SQLite needs Redis to carry changes; PostgreSQL alone tells both workers by NOTIFY (without Redis a
    cached token is never refreshed otherwise)."""
    admin_key = "cli-test-admin-key-0123456789"
    proxy_port, admin_port = _free_port(), _free_port()
    if store_backend == "sqlite":
        store: dict[str, str] = {"GATEWAY_REDIS_URL": request.getfixturevalue("redis_url")}
    else:
        store = {"GATEWAY_DATABASE_URL": database_url}
        code, stderr = await _run_to_exit(tmp_path, "migrate", **store)
        assert code == 0, stderr
    environment = _environment(
        tmp_path,
        GATEWAY_UPSTREAM=upstream.url,
        GATEWAY_ADMIN_KEY=admin_key,
        GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}",
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
        **store,
    )
    admin = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "admin", env=environment)
    proxy = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "proxy", "--workers", "2", env=environment
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(1200):  # generous: three interpreters start on two busy cores
                try:
                    async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("gateway admin never became ready")
            async with session.post(
                f"http://127.0.0.1:{admin_port}/v1/tokens",
                json={"name": "workers", "access_level": "read_only"},
                headers={"Authorization": f"Bearer {admin_key}"},
            ) as response:
                created = await response.json()
            statuses = []
            for _ in range(1200):
                try:
                    async with session.get(
                        f"http://127.0.0.1:{proxy_port}/api/x", headers={"Authorization": f"Bearer {created['token']}"}
                    ) as response:
                        statuses.append(response.status)
                        if len(statuses) >= 20:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            assert statuses[-20:] == [200] * 20
            async with session.post(
                f"http://127.0.0.1:{admin_port}/v1/tokens/{created['id']}/disable",
                headers={"Authorization": f"Bearer {admin_key}"},
            ) as response:
                assert response.status == 200
            # Whichever worker answers, the token is now refused (each has heard of the change).
            for _ in range(500):
                codes = []
                for _ in range(10):
                    async with session.get(
                        f"http://127.0.0.1:{proxy_port}/api/x", headers={"Authorization": f"Bearer {created['token']}"}
                    ) as response:
                        codes.append(response.status)
                if codes == [401] * 10:
                    break
                await asyncio.sleep(0.01)
            assert codes == [401] * 10
        proxy.send_signal(signal.SIGTERM)
        admin.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proxy.wait(), timeout=30) == 0
        assert await asyncio.wait_for(admin.wait(), timeout=30) == 0
    finally:
        for process in (proxy, admin):
            if process.returncode is None:
                process.terminate()  # the workers stop with their parent, even if it has to be killed
                try:
                    await asyncio.wait_for(process.wait(), timeout=15)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def test_serve_with_forward_auth_and_no_upstream_answers_forward_auth_only(tmp_path: Path) -> None:
    admin_key = "cli-test-admin-key-0123456789"
    proxy_port, admin_port, auth_port = _free_port(), _free_port(), _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--forward-auth-listen", f"127.0.0.1:{auth_port}",
        env=_environment(
            tmp_path,
            GATEWAY_ADMIN_KEY=admin_key,
            GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}",
            GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
        ),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(400):
                try:
                    async with session.get(f"http://127.0.0.1:{admin_port}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            async with session.post(
                f"http://127.0.0.1:{admin_port}/v1/tokens",
                json={"name": "nginx", "access_level": "read_only"},
                headers={"Authorization": f"Bearer {admin_key}"},
            ) as response:
                created = await response.json()
            headers = {
                "Authorization": f"Bearer {created['token']}",
                "X-Original-Method": "GET",
                "X-Original-URI": "/api/posts",
            }
            async with session.get(f"http://127.0.0.1:{auth_port}/auth", headers=headers) as response:
                assert response.status == 200
                assert response.headers["X-Gateway-Token-Id"] == created["id"]
            with pytest.raises(aiohttp.ClientConnectionError):
                async with session.get(f"http://127.0.0.1:{proxy_port}/api/posts", headers=headers):
                    pass
        process.send_signal(signal.SIGTERM)
        output = await _stderr_until_exit(process)
        assert await process.wait() == 0
        assert f"forward-auth listening on http://127.0.0.1:{auth_port}" in output
        assert created["token"] not in output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
