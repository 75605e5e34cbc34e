"""Real parts only: a real upstream aiohttp app on a real port, a real SQLite file, real gateway apps."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from pytest_aiohttp import AiohttpClient, AiohttpServer
from yarl import URL

from admin_api.admin_auth import AdminAuthenticator
from admin_api.app import create_admin_app
from gateway.access_log import AccessLog
from gateway.core import Core, open_core
from gateway.forward_auth import forward_auth_handler_key
from gateway.http_server import HandlerSite, HttpRunner
from gateway.proxy_app import create_proxy_app
from gateway.settings import Settings, load_settings
from gateway.store import SQLiteStore
from gateway.tokens import TokenRecord
from tests.postgres_server import PostgresServer
from tests.redis_server import RedisClusterSet, RedisServer

ADMIN_KEY = "test-admin-key-0123456789abcdef"
# Cheap argon2 parameters keep the suite fast; the code path is the same as with the defaults.
FAST_ARGON2 = {"argon2.time_cost": 1, "argon2.memory_cost_kib": 1024}


@dataclass
class Upstream:
    """A real upstream service on a real port, recording what reached it."""

    server: TestServer
    requests: list[dict[str, Any]] = field(default_factory=list)
    held: asyncio.Event = field(default_factory=asyncio.Event)  # a request to /held has arrived
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ... and is answered once this is set

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def last(self) -> dict[str, Any]:
        return self.requests[-1]


def _upstream_app(upstream_state: list[Upstream]) -> web.Application:
    async def record(request: web.Request, **extra: Any) -> dict[str, Any]:
        seen = {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": {k: v for k, v in request.headers.items()},
            "header_pairs": list(request.headers.items()),
            **extra,
        }
        upstream_state[0].requests.append(seen)
        return seen

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen = await record(request, body=body.decode(errors="replace"))
        return web.json_response(seen, headers={"X-Upstream": "yes", "Set-Cookie": "session=upstream"})

    async def sha256(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        await record(request, size=size)
        return web.json_response({"sha256": digest.hexdigest(), "size": size})

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query["bytes"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if "chunked" not in request.query:
            response.content_length = size
        await response.prepare(request)
        block = bytes(range(256)) * 256
        sent = size if request.method == "HEAD" else 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await record(request)
        return response

    async def status(request: web.Request) -> web.Response:
        await record(request)
        code = int(request.match_info["code"])
        return web.Response(status=code, text="" if code in (204, 304) else json.dumps({"status": code}))

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("seconds", "5")))
        return web.json_response({"slow": True})

    async def held(request: web.Request) -> web.Response:
        await record(request)
        upstream_state[0].held.set()
        await upstream_state[0].release.wait()
        return web.json_response({"held": True})

    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/sha256", sha256)
    app.router.add_get("/download", download)
    app.router.add_route("*", "/status/{code:\\d+}", status)
    app.router.add_get("/slow", slow)
    app.router.add_get("/held", held)
    app.router.add_route("*", "/{path:.*}", echo)
    return app


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole suite; tests that kill Redis start their own."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared redis-server, emptied for this test."""
    import redis

    with redis.Redis(port=redis_server.port) as client:
        client.flushall()
    return redis_server.url


REDIS_CLUSTER_PASSWORD = "cluster-test-redis-password-42"


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterSet]:
    """A real Redis Cluster of its own for this test (three primaries, a replica each, a password), quick to
    fail over; tests kill its nodes."""
    cluster = RedisClusterSet(tmp_path / "redis-cluster", password=REDIS_CLUSTER_PASSWORD)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole suite, started on first use; each test gets its own database."""
    server = PostgresServer()
    try:
        server.initialise()
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
async def postgres_url(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A fresh, empty database on the shared server for this test, dropped after it."""
    import asyncpg

    name = f"test_{uuid.uuid4().hex[:16]}"
    connection = await asyncpg.connect(postgres_server.url())
    try:
        await connection.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    finally:
        await connection.close()
    yield postgres_server.url(name)
    connection = await asyncpg.connect(postgres_server.url())
    try:
        await connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await connection.close()


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> Upstream:
    state: list[Upstream] = []
    # The gateway adds a space after each comma of a forwarded chain: room for 1000 hops in one header.
    server = await aiohttp_server(_upstream_app(state), max_field_size=16384)
    state.append(Upstream(server))
    return state[0]


SettingsFactory = Callable[..., Settings]


STORE_BACKENDS = ("sqlite", "postgresql")
both_store_backends = pytest.mark.parametrize("store_backend", STORE_BACKENDS, indirect=True)
"""Mark a test or module to run once on each store: `pytestmark = both_store_backends`."""


@pytest.fixture(params=["sqlite"])
def store_backend(request: pytest.FixtureRequest) -> str:
    """The store backend the test's gateways use: SQLite unless the test asks for both_store_backends."""
    return str(request.param)


@pytest.fixture
def database_url(store_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The store for this test's gateways: a SQLite file in tmp_path, or a fresh PostgreSQL database."""
    if store_backend == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'gateway.db'}"


@pytest.fixture
def make_settings(database_url: str, upstream: Upstream) -> SettingsFactory:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "upstream": upstream.url,
            "database_url": database_url,
            "admin_key": ADMIN_KEY,
            "usage_flush_interval": 0.1,
            **FAST_ARGON2,
        }
        values.update(overrides)
        return load_settings(config_path=values.pop("config_path", None), environ={}, overrides=values)

    return make


class GatedStore(SQLiteStore):
    """The real SQLite store on the same file, whose token reads are held back after they ran.

    It forces the interleaving a busy process can produce: a cache fill reads the store before a change
    commits, and its answer arrives after the change was written through.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.read_done = asyncio.Event()
        self.gate = asyncio.Event()

    async def get_token(self, token_id: str) -> TokenRecord | None:
        record = await super().get_token(token_id)
        self.read_done.set()
        await self.gate.wait()
        return record


class SettableClock:
    """The admin plane's wall clock, set by the test: it starts at the real time and moves only when told."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class ProxyTestServer(TestServer):
    """Serves the proxy plane the way `gateway proxy` does: its Application's lifecycle, http_server's port."""

    def __init__(self, app: web.Application, *, access_log: AccessLog | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._access_log = access_log

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return HttpRunner(self.app, access_log=self._access_log, **kwargs)


@dataclass
class Gateway:
    """Both planes of one gateway process, each on its own real port, sharing one core."""

    core: Core
    proxy: TestClient
    admin: TestClient
    database: Path | None
    """The SQLite file, or None on PostgreSQL."""
    _core_context: Any = field(repr=False)
    access_log: AccessLog | None = None
    access_log_path: Path | None = None
    closed: bool = False

    async def close(self) -> None:
        """Stop both planes and close the store, as a process exit would."""
        if not self.closed:
            self.closed = True
            for client in (self.proxy, self.admin):
                if client is not None:
                    await client.close()
            if self.access_log is not None:
                self.access_log.close()
            await self._core_context.__aexit__(None, None, None)

    def access_lines(self) -> list[str]:
        """The proxy's access log so far (written out first, as the batch timer would)."""
        if self.access_log is None or self.access_log_path is None:
            return []
        if not self.closed:
            self.access_log.flush()
        return self.access_log_path.read_text().splitlines()

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    async def create_token(self, **fields: Any) -> dict[str, Any]:
        body = {"name": "CRM sync", "access_level": "administrative", **fields}
        response = await self.admin.post("/v1/tokens", json=body, headers=self.admin_headers)
        assert response.status == 201, await response.text()
        return dict(await response.json())

    async def admin_call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        response = await self.admin.request(method, path, headers=self.admin_headers, **kwargs)
        text = await response.text()
        return response.status, (json.loads(text) if text else None)

    async def call(self, token: str | None, path: str = "/api/posts", method: str = "GET", **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self.proxy.request(method, path, headers=headers, **kwargs)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(
    make_settings: SettingsFactory, aiohttp_client: AiohttpClient, tmp_path: Path
) -> AsyncIterator[GatewayFactory]:
    """Starts a gateway on the test's store (a SQLite file, or PostgreSQL with both_store_backends); call it
    again after closing one to 'restart'."""
    started: list[Gateway] = []

    async def start(
        planes: tuple[str, ...] = ("proxy", "admin"), clock: SettableClock | None = None, **overrides: Any
    ) -> Gateway:
        """`planes` picks what this 'process' runs, as `gateway proxy` or `gateway admin` would; `clock`
        replaces the admin plane's wall clock."""
        settings = make_settings(**overrides)
        context = (
            open_core(settings, migrate=True) if clock is None else open_core(settings, clock=clock, migrate=True)
        )
        core = await context.__aenter__()
        authenticator = AdminAuthenticator(
            core.store,
            core.hasher,
            prefix=settings.token_prefix,
            failure_limit=settings.failure_limit_per_source,
            failure_window=settings.failure_window,
        )
        await authenticator.bootstrap(settings.admin_key)
        # The access log is on, as it is by default, so tests that look for leaks read its lines too.
        access_log_path = tmp_path / f"access-{len(started)}.log"
        access_log = AccessLog.open(access_log_path, json=settings.log_format == "json")
        proxy = (
            await aiohttp_client(ProxyTestServer(create_proxy_app(core), access_log=access_log))
            if "proxy" in planes
            else None
        )
        admin = await aiohttp_client(create_admin_app(core, authenticator)) if "admin" in planes else None
        started.append(
            Gateway(core, proxy, admin, settings.database_path, context, access_log, access_log_path)  # type: ignore[arg-type]
        )
        if core.shared is not None and proxy is not None:
            await asyncio.wait_for(core.shared.listener.connected.wait(), timeout=10)
        if core.store_listener is not None and proxy is not None:
            await asyncio.wait_for(core.store_listener.connected.wait(), timeout=10)
        return started[-1]

    yield start
    for gateway in reversed(started):
        await gateway.close()


@pytest.fixture
async def gateway(start_gateway: GatewayFactory) -> Gateway:
    return await start_gateway()


async def send_raw(client: TestClient, request: bytes) -> tuple[int, bytes]:
    """Send bytes exactly as written (no client-side URL normalization) and return status and raw reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(request)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(1 << 20), timeout=10)
    finally:
        writer.close()
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
    return status, reply


async def eventually(check: Callable[[], Awaitable[bool]], *, attempts: int = 500, pause: float = 0.01) -> None:
    """Retry `check` until it holds; bounded in count, and it asserts an outcome, never a duration."""
    for _ in range(attempts):
        if await check():
            return
        await asyncio.sleep(pause)
    raise AssertionError("the expected state was never reached")


@dataclass
class ForwardAuth:
    """A gateway with its forward-auth port open beside the proxy port, as `--forward-auth-listen` opens it."""

    gateway: Gateway
    port: int
    session: aiohttp.ClientSession

    async def ask(
        self, method: str = "GET", target: str = "/auth", headers: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        url = URL(f"http://127.0.0.1:{self.port}{target}", encoded=True)
        async with self.session.request(method, url, headers=headers or {}) as response:
            await response.read()
            return response

    async def nginx(self, token: str | None, method: str, uri: str, **headers: str) -> aiohttp.ClientResponse:
        sent = {"X-Original-Method": method, "X-Original-URI": uri, **headers}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        return await self.ask(headers=sent)


StartForwardAuth = Callable[..., Awaitable[ForwardAuth]]


async def open_forward_auth(gateway: Gateway) -> int:
    """Open the forward-auth port on the gateway's data plane, as the command line does."""
    runner = gateway.proxy.server.runner
    assert isinstance(runner, HttpRunner)
    site = HandlerSite(runner, "127.0.0.1", 0, handler=runner.app[forward_auth_handler_key])
    await site.start()
    return site.port


@pytest.fixture
async def start_forward_auth(start_gateway: GatewayFactory) -> AsyncIterator[StartForwardAuth]:
    sessions: list[aiohttp.ClientSession] = []

    async def start(**overrides: Any) -> ForwardAuth:
        gateway = await start_gateway(forward_auth_listen="127.0.0.1:0", **overrides)
        sessions.append(aiohttp.ClientSession())
        return ForwardAuth(gateway, await open_forward_auth(gateway), sessions[-1])

    yield start
    for session in sessions:
        await session.close()


@pytest.fixture
async def forward_auth(start_forward_auth: StartForwardAuth) -> ForwardAuth:
    return await start_forward_auth()
