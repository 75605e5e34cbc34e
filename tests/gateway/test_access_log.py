"""The access log: one line per request with what an operator needs and nothing secret (the token by id, never
what was presented; no query string), written in batches, and nothing lost when the process stops."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import aiohttp
import pytest

from gateway.access_log import AccessLog
from tests.conftest import Gateway, GatewayFactory, Upstream, send_raw
from tests.gateway.test_cli import _environment, _free_port


async def test_access_log_names_the_token_id_and_never_the_authorization_value(gateway: Gateway) -> None:
    created = await gateway.create_token(access_level="read_only")
    token, token_id = created["token"], created["id"]
    wrong = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")

    answers = [
        (await gateway.call(token, "/api/posts")).status,
        (await gateway.call(token, "/api/posts", method="POST")).status,
        (await gateway.call(wrong, "/api/posts")).status,
        (await gateway.call(None, "/api/posts", headers={"Authorization": f"Basic {token}"})).status,
    ]

    assert answers == [200, 403, 401, 401]
    lines = gateway.access_lines()
    assert len(lines) == 4, lines
    assert [line.split('"')[1] for line in lines] == [
        "GET /api/posts", "POST /api/posts", "GET /api/posts", "GET /api/posts"
    ]
    assert [line.split('" ')[1].split()[0] for line in lines] == ["200", "403", "401", "401"]
    assert [line.split("token=")[1].split()[0] for line in lines] == [token_id, token_id, "-", "-"]
    for secret in (token, wrong, token.rsplit("_", 1)[-1], "Bearer", "Basic"):
        assert not any(secret in line for line in lines), secret


async def test_access_log_leaves_out_the_query_where_a_client_may_put_its_token(gateway: Gateway) -> None:
    token = (await gateway.create_token())["token"]

    response = await gateway.call(token, f"/api/posts?access_token={token}&page=2")

    assert response.status == 200
    lines = gateway.access_lines()
    assert len(lines) == 1 and '"GET /api/posts" 200 ' in lines[0], lines
    assert token not in lines[0] and "access_token" not in lines[0]


async def test_access_log_of_a_raw_request_with_a_malformed_authorization_prints_none_of_it(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = (await gateway.create_token())["token"]
    presented = f"Bearer {token} {token}"

    status, reply = await send_raw(
        gateway.proxy,
        f"GET /api/posts HTTP/1.1\r\nHost: api\r\nAuthorization: {presented}\r\nConnection: close\r\n\r\n".encode(),
    )

    assert status == 401 and token.encode() not in reply
    lines = gateway.access_lines()
    assert len(lines) == 1 and " 401 " in lines[0] and "token=-" in lines[0], lines
    assert token not in caplog.text and token not in lines[0]


async def test_each_line_has_time_client_request_status_bytes_token_id_and_duration(gateway: Gateway) -> None:
    proxy = gateway.proxy
    created = await gateway.create_token(access_level="read_only")
    bearer = {"Authorization": f"Bearer {created['token']}"}
    answers = [
        await proxy.get("/api/posts?api_key=hidden-value&page=2", headers=bearer),
        await proxy.delete("/api/posts/7", headers=bearer),
        await proxy.get("/api/posts"),
    ]
    sizes = [len(await answer.read()) for answer in answers]

    lines = gateway.access_lines()
    assert len(lines) == 3
    assert not any(created["token"] in line or "hidden-value" in line for line in lines)
    first, second, third = (line.split(" ") for line in lines)
    assert first[1:] == ["127.0.0.1", '"GET', '/api/posts"', "200", str(sizes[0]), f"token={created['id']}", first[-1]]
    assert second[3:7] == ['/api/posts/7"', "403", str(sizes[1]), f"token={created['id']}"]
    assert third[3:7] == ['/api/posts"', "401", str(sizes[2]), "token=-"]
    assert first[0].endswith("Z") and first[-1].endswith("us")


async def test_json_lines_carry_the_same_fields(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(log_format="json")
    proxy = gateway.proxy
    created = await gateway.create_token(access_level="read_only")
    answer = await proxy.get("/api/posts?q=1", headers={"Authorization": f"Bearer {created['token']}"})
    size = len(await answer.read())
    await proxy.get("/api/posts")

    allowed, anonymous = (json.loads(line) for line in gateway.access_lines())
    assert set(allowed) == {"time", "client", "method", "path", "status", "bytes", "token_id", "duration_us"}
    assert (allowed["client"], allowed["method"], allowed["path"]) == ("127.0.0.1", "GET", "/api/posts")
    assert (allowed["status"], allowed["bytes"], allowed["token_id"]) == (200, size, created["id"])
    assert allowed["duration_us"] >= 0
    assert anonymous["status"] == 401 and anonymous["token_id"] is None


async def test_quotes_and_backslashes_in_a_path_are_escaped_in_both_formats(start_gateway: GatewayFactory) -> None:
    for json_lines in (False, True):
        gateway = await start_gateway(log_format="json" if json_lines else "text")
        status, _ = await send_raw(gateway.proxy, b'GET /a"b\\c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        lines = [line.encode() for line in gateway.access_lines()]
        await gateway.close()
        assert len(lines) == 1 and lines[0].isascii()
        if json_lines:
            assert json.loads(lines[0])["path"] == "/a\\x22b\\x5cc"
        else:
            assert b'"GET /a\\x22b\\x5cc"' in lines[0] and f" {status} ".encode() in lines[0]


async def test_lines_are_written_in_batches_not_one_write_per_request(gateway: Gateway) -> None:
    proxy = gateway.proxy
    created = await gateway.create_token(access_level="read_only")
    bearer = {"Authorization": f"Bearer {created['token']}"}
    for _ in range(200):
        async with proxy.get("/api/posts", headers=bearer) as answer:
            await answer.read()
    assert len(gateway.access_lines()) == 200
    assert gateway.access_log is not None and gateway.access_log.writes < 20


async def test_a_path_is_escaped_once_whatever_query_follows_it(tmp_path: Path) -> None:
    """The logged form of a path is remembered by the path alone: a client varying its query string does not
    fill the memo with one entry per target."""
    fd = os.open(tmp_path / "access.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    access_log = AccessLog(fd, name="access.log", owns_fd=True)
    for page in range(50):
        access_log.request("192.0.2.1", "-", "GET", b"/api/posts?page=%d" % page, 200, 0, 0.0)
    access_log.request("192.0.2.1", "-", "GET", b"/api/posts", 200, 0, 0.0)
    assert len(access_log._paths) == 1 and len(access_log._middles) == 1  # no query kept in memory either
    access_log.close()
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert len(lines) == 51 and all('"GET /api/posts" 200 0 token=- 0us' in line for line in lines)


async def test_a_failing_write_is_logged_once_and_again_when_writing_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC, like a full disk
    fd = os.dup(full)
    access_log = AccessLog(fd, name="access.log", max_lines=2)
    with caplog.at_level(logging.WARNING, logger="gateway.access_log"):
        for _ in range(10):
            access_log.request("192.0.2.1", "-", "GET", b"/x", 200, 0, 0.0)
        working = os.open(tmp_path / "access.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(working, fd)  # the disk has room again
        for _ in range(4):
            access_log.request("192.0.2.1", "-", "GET", b"/x", 200, 0, 0.0)
    access_log.close()
    for handle in (full, fd, working):
        os.close(handle)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "access log: cannot write to access.log (ENOSPC); dropping lines until it works again",
        "access log: writing to access.log again; 10 line(s) were lost",
    ]
    assert len((tmp_path / "access.log").read_text().splitlines()) == 4


def _full_pipe() -> tuple[int, int, bytes]:
    """A pipe whose non-blocking write end takes no more (like stderr to a collector that lags), and what
    filled it."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    filled = bytearray()
    while True:
        try:
            filled += b"f" * os.write(write_end, b"f" * 65536)
        except BlockingIOError:
            return read_end, write_end, bytes(filled)


def _read_all(read_end: int) -> bytes:
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_a_full_pipe_never_blocks_the_event_loop_and_loses_no_line(tmp_path: Path) -> None:
    read_end, write_end, filled = _full_pipe()
    access_log = AccessLog(write_end, name="pipe", owns_fd=True, max_lines=10)
    for number in range(100):
        access_log.request("192.0.2.1", "-", "GET", b"/line/%d" % number, 200, 0, 0.0)
    await asyncio.sleep(0)  # the loop runs on while the lines wait for the reader
    assert access_log.lines_written == 0
    received = bytearray()
    loop = asyncio.get_running_loop()

    def readable() -> None:
        received.extend(os.read(read_end, 65536))

    loop.add_reader(read_end, readable)
    try:
        async with asyncio.timeout(30):
            while access_log.lines_written < 100:
                await asyncio.sleep(0.01)
    finally:
        loop.remove_reader(read_end)
    access_log.close()
    received += _read_all(read_end)
    os.close(read_end)
    lines = bytes(received[len(filled):]).decode().splitlines()
    assert [line.split('"')[1] for line in lines] == [f"GET /line/{number}" for number in range(100)]


async def test_close_waits_for_a_lagging_reader_rather_than_lose_lines() -> None:
    read_end, write_end, filled = _full_pipe()
    access_log = AccessLog(write_end, name="pipe", owns_fd=True, max_lines=10)
    for number in range(25):
        access_log.request("192.0.2.1", "-", "GET", b"/line/%d" % number, 200, 0, 0.0)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(_read_all(read_end)))
    reader.start()  # drains the pipe only while close() waits; it ends when close() releases the write end
    access_log.close()
    reader.join(timeout=30)
    os.close(read_end)
    lines = received[0][len(filled):].decode().splitlines()
    assert [line.split('"')[1] for line in lines] == [f"GET /line/{number}" for number in range(25)]
    assert access_log.lines_written == 25


async def test_sigterm_writes_every_line_before_gateway_serve_exits(tmp_path: Path, upstream: Upstream) -> None:
    admin_key = "access-log-admin-key-0123456789"
    log_file = tmp_path / "access.log"
    proxy_port, admin_port = _free_port(), _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve",
        env=_environment(
            tmp_path,
            GATEWAY_UPSTREAM=upstream.url,
            GATEWAY_ADMIN_KEY=admin_key,
            GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}",
            GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
            GATEWAY_ACCESS_LOG_FILE=str(log_file),
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
                json={"name": "logged", "access_level": "read_only"},
                headers={"Authorization": f"Bearer {admin_key}"},
            ) as response:
                token = (await response.json())["token"]
            for _ in range(300):
                async with session.get(
                    f"http://127.0.0.1:{proxy_port}/api/posts", headers={"Authorization": f"Bearer {token}"}
                ) as response:
                    assert response.status == 200
        process.send_signal(signal.SIGTERM)  # at once: most of these lines are still in the buffer
        assert process.stderr is not None
        stderr = (await asyncio.wait_for(process.stderr.read(), timeout=30)).decode()
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = log_file.read_text().splitlines()
    proxy_lines = [line for line in lines if '"GET /api/posts"' in line]
    assert len(proxy_lines) == 300 and all(" 200 " in line for line in proxy_lines)
    assert sum('"POST /v1/tokens" 201' in line for line in lines) == 1
    assert token not in log_file.read_text() and '"GET /api/posts"' not in stderr


async def test_json_log_format_makes_every_stderr_line_json(tmp_path: Path, upstream: Upstream) -> None:
    proxy_port, admin_port = _free_port(), _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve",
        env=_environment(
            tmp_path,
            GATEWAY_UPSTREAM=upstream.url,
            GATEWAY_ADMIN_KEY="access-log-admin-key-0123456789",
            GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}",
            GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
            GATEWAY_LOG_FORMAT="json",
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
            async with session.get(f"http://127.0.0.1:{proxy_port}/api/posts") as response:
                assert response.status == 401
        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        stderr = (await asyncio.wait_for(process.stderr.read(), timeout=30)).decode()
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    entries = [json.loads(line) for line in stderr.splitlines()]
    messages = [entry["message"] for entry in entries if "message" in entry]
    assert "stopped" in messages and all(entry["level"] == "INFO" for entry in entries if "level" in entry)
    requests = [entry for entry in entries if "status" in entry]
    assert [(entry["path"], entry["status"]) for entry in requests if entry["path"] == "/api/posts"] == [
        ("/api/posts", 401)
    ]
    assert any(entry["path"] == "/healthz" and entry["admin_key_id"] is None for entry in requests)
