"""TLS on the proxy port, against a real `gateway serve`: certificates the test makes with openssl, real TLS
clients, and a SIGHUP reload that new handshakes see while an open connection carries on."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.settings import SettingsError, load_settings
from tests.conftest import Upstream

ADMIN_KEY = "tls-test-admin-key-0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 whose common name is `name`, and its key."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@dataclass
class TlsGateway:
    process: asyncio.subprocess.Process
    proxy_port: int
    admin_url: str
    cert: Path
    key: Path


@pytest.fixture
async def tls_gateway(tmp_path: Path, upstream: Upstream) -> AsyncIterator[TlsGateway]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificates (scripts/test installs it)")
    first_cert, first_key = make_certificate(tmp_path, "first")
    cert, key = tmp_path / "proxy.crt", tmp_path / "proxy.key"
    shutil.copy(first_cert, cert)
    shutil.copy(first_key, key)
    proxy_port, admin_port = _free_port(), _free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    environment.update(
        GATEWAY_UPSTREAM=upstream.url,
        GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}",
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
        GATEWAY_DATABASE_URL=f"sqlite:///{tmp_path / 'tls.db'}",
        GATEWAY_ADMIN_KEY=ADMIN_KEY,
        GATEWAY_PROXY_TLS_CERT=str(cert),
        GATEWAY_PROXY_TLS_KEY=str(key),
        GATEWAY_ACCESS_LOG="false",
        GATEWAY_ARGON2_TIME_COST="1",
        GATEWAY_ARGON2_MEMORY_COST_KIB="1024",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", env=environment, stderr=asyncio.subprocess.PIPE
    )
    gateway = TlsGateway(process, proxy_port, f"http://127.0.0.1:{admin_port}", cert, key)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(400):
                try:
                    async with session.get(f"{gateway.admin_url}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("gateway serve did not become healthy")
        yield gateway
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _client_context(*trusted: Path) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for cert in trusted:
        context.load_verify_locations(cert)
    return context


async def _create_token(gateway: TlsGateway) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{gateway.admin_url}/v1/tokens",
            json={"name": "tls", "access_level": "read_only"},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as response:
            assert response.status == 201
            return str((await response.json())["token"])


class Connection:
    """One raw TLS connection to the proxy port, kept open across requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        return cls(reader, writer)

    @property
    def certificate_name(self) -> str:
        ssl_object = self.writer.get_extra_info("ssl_object")
        subject = dict(item[0] for item in ssl_object.getpeercert()["subject"])
        return str(subject["commonName"])

    async def get(self, path: str, token: str) -> int:
        self.writer.write(
            f"GET {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        await self.writer.drain()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout=10)
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
        await asyncio.wait_for(self.reader.readexactly(length), timeout=10)
        return int(lines[0].split()[1])

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def test_proxy_port_serves_tls_and_tells_the_upstream_https(
    tls_gateway: TlsGateway, upstream: Upstream
) -> None:
    token = await _create_token(tls_gateway)
    connector = aiohttp.TCPConnector(ssl=_client_context(tls_gateway.cert))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(
            f"https://127.0.0.1:{tls_gateway.proxy_port}/api/posts",
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 200
            assert (await response.json())["raw_path"] == "/api/posts"
    assert upstream.last["headers"]["X-Forwarded-Proto"] == "https"
    connection = await Connection.open(tls_gateway.proxy_port, _client_context(tls_gateway.cert))
    try:
        assert connection.writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    finally:
        await connection.close()


async def test_a_client_limited_to_tls_1_1_is_refused(tls_gateway: TlsGateway) -> None:
    context = _client_context(tls_gateway.cert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the point: an old client
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await Connection.open(tls_gateway.proxy_port, context)


async def test_sighup_reloads_the_certificate_for_new_connections_and_keeps_open_ones(
    tls_gateway: TlsGateway, tmp_path: Path
) -> None:
    token = await _create_token(tls_gateway)
    second_cert, second_key = make_certificate(tmp_path, "second")
    trusting_both = _client_context(tmp_path / "first.crt", second_cert)
    old = await Connection.open(tls_gateway.proxy_port, trusting_both)
    try:
        assert old.certificate_name == "first"
        assert await old.get("/api/one", token) == 200

        shutil.copy(second_cert, tls_gateway.cert)
        shutil.copy(second_key, tls_gateway.key)
        tls_gateway.process.send_signal(signal.SIGHUP)
        for _ in range(200):
            new = await Connection.open(tls_gateway.proxy_port, trusting_both)
            name = new.certificate_name
            if name == "second":
                assert await new.get("/api/new", token) == 200
            await new.close()
            if name == "second":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the new certificate was never served")

        assert await old.get("/api/two", token) == 200
        assert old.certificate_name == "first"
    finally:
        await old.close()
    assert tls_gateway.process.returncode is None


async def test_a_broken_certificate_on_sighup_keeps_the_current_one(tls_gateway: TlsGateway) -> None:
    tls_gateway.key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    tls_gateway.process.send_signal(signal.SIGHUP)
    assert tls_gateway.process.stderr is not None
    while b"TLS certificate not reloaded" not in (
        line := await asyncio.wait_for(tls_gateway.process.stderr.readline(), timeout=30)
    ):
        assert line, "the gateway exited"
    connection = await Connection.open(tls_gateway.proxy_port, _client_context(tls_gateway.cert))
    try:
        assert connection.certificate_name == "first"
    finally:
        await connection.close()


def test_a_proxy_certificate_without_its_key_stops_start_up(tmp_path: Path) -> None:
    cert, _ = make_certificate(tmp_path, "alone")
    with pytest.raises(SettingsError, match="'proxy_tls_cert' and 'proxy_tls_key' must be given together"):
        load_settings(environ={"GATEWAY_PROXY_TLS_CERT": str(cert)})


async def test_sighup_to_proxy_workers_reloads_the_certificate_in_each_of_them(
    tmp_path: Path, upstream: Upstream, redis_url: str
) -> None:
    first_cert, first_key = make_certificate(tmp_path, "first")
    second_cert, second_key = make_certificate(tmp_path, "second")
    cert, key = tmp_path / "proxy.crt", tmp_path / "proxy.key"
    shutil.copy(first_cert, cert)
    shutil.copy(first_key, key)
    port = _free_port()
    environment = {name: item for name, item in os.environ.items() if not name.startswith("GATEWAY_")}
    environment.update(
        GATEWAY_UPSTREAM=upstream.url,
        GATEWAY_REDIS_URL=redis_url,
        GATEWAY_PROXY_LISTEN=f"127.0.0.1:{port}",
        GATEWAY_DATABASE_URL=f"sqlite:///{tmp_path / 'workers.db'}",
        GATEWAY_PROXY_TLS_CERT=str(cert),
        GATEWAY_PROXY_TLS_KEY=str(key),
        GATEWAY_ACCESS_LOG="false",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "proxy",
        "--workers",
        "2",
        env=environment,
        stderr=asyncio.subprocess.PIPE,
    )
    trusting_both = _client_context(first_cert, second_cert)

    async def names(count: int) -> list[str]:
        """The certificate names of `count` new connections (the kernel spreads them over the workers)."""
        seen = []
        for _ in range(count):
            try:
                connection = await Connection.open(port, trusting_both)
            except OSError:
                seen.append("")
                continue
            seen.append(connection.certificate_name)
            await connection.close()
        return seen

    try:
        assert process.stderr is not None
        listening = 0
        said: list[bytes] = []
        while listening < 2:  # both workers have loaded the first certificate
            try:
                line = await asyncio.wait_for(process.stderr.readline(), timeout=60)
            except TimeoutError:
                raise AssertionError(f"both workers did not start; they said: {said!r}") from None
            assert line, f"the workers exited; they said: {said!r}"
            said.append(line)
            listening += b"proxy listening on https://" in line
        assert await names(4) == ["first"] * 4
        shutil.copy(second_cert, cert)
        shutil.copy(second_key, key)
        process.send_signal(signal.SIGHUP)
        for _ in range(200):
            if await names(20) == ["second"] * 20:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("a worker kept the old certificate")
        assert process.returncode is None
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=30)
            except TimeoutError:
                process.kill()
                await process.wait()
