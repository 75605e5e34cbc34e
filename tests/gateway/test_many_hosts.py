"""The gateway over many hosts: two `gateway proxy` processes and one `gateway admin`, each on a host of its
own, with PostgreSQL and Redis on two more, and no process holding a store file of its own.

Each host is a network namespace on a private bridge when the suite runs as root (tests/hosts.py). Where
namespaces are not allowed, the hosts are separate loopback addresses (127.0.0.2, ...) with separate working
directories instead: every process still has its own address, directory and no SQLite path, but the
network does not keep them apart (the first test prints which it was).

The processes are the real command line, run as the least-privilege database roles of
deploy/postgres/roles.sql and grants.sql: the admin as gateway_admin, the proxies as gateway_proxy, the
schema made by `gateway migrate` as gateway_migrate.

Every proxy trusts a cached token for `cache_ttl` = 60 s, the most it allows, so a change that shows on a
proxy sooner than that got there by propagation (Redis pub/sub, or PostgreSQL's NOTIFY with Redis stopped),
never by an entry expiring. Waits are polls bounded in attempts; nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.token_format import issue_token, new_token_id
from tests.hosts import Host, Hosts
from tests.postgres_server import PostgresServer
from tests.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "many-hosts-admin-key-0123456789"
ROLE_PASSWORDS = {"migrate": "migrate-pw-0123", "admin": "admin-pw-4567", "proxy": "proxy-pw-89ab"}
REDIS_PASSWORD = "many-hosts-redis-pw-0123"
DATABASE = "gateway"
PROXIES = ("proxy-a", "proxy-b")
LISTENER = "api-token-gateway-listener"  # the application_name of each proxy's NOTIFY connection


def _environment(**settings: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    environment.update({"GATEWAY_" + name.upper(): value for name, value in settings.items()})
    return environment


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def _poll(check: Callable[[], bool], what: str, attempts: int = 600, pause: float = 0.05) -> None:
    for _ in range(attempts):
        if check():
            return
        time.sleep(pause)
    raise AssertionError(f"never happened: {what}")


@dataclass
class Deployment:
    hosts: Hosts
    postgres: PostgresServer
    redis: RedisServer
    admin_url: str
    proxy_urls: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def role_url(self, role: str) -> str:
        where = f"{self.postgres.host}:{self.postgres.port}"
        return f"postgresql://gateway_{role}:{ROLE_PASSWORDS[role]}@{where}/{DATABASE}"

    def psql(self, *arguments: str, url: str | None = None) -> str:
        """psql, as an operator runs it: `-c SQL`, or `-f FILE` with `-v name=value` variables."""
        result = subprocess.run(
            [
                str(self.postgres.bin / "psql"),
                url or self.postgres.url(DATABASE),
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                *arguments,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def listeners(self) -> list[str]:
        """The database roles of the proxies' NOTIFY connections now open."""
        rows = self.psql("-c", f"SELECT usename FROM pg_stat_activity WHERE application_name = '{LISTENER}'")
        return sorted(rows.split()) if rows else []

    def ready(self) -> None:
        """Every process answers its readiness probe, and both proxies listen to the store and to Redis."""
        _poll(lambda: _get(f"{self.admin_url}/readyz") == 200, "the admin API is ready")
        for name, url in self.proxy_urls.items():
            probe = f"{url}/.gateway/health"
            _poll(lambda probe=probe: _get(probe) == 200, f"{name} is ready")  # type: ignore[misc]
        _poll(
            lambda: self.listeners() == ["gateway_proxy", "gateway_proxy"], "both proxies LISTEN to the store"
        )

        import redis

        with redis.Redis(host=self.redis.host, port=self.redis.port, password=REDIS_PASSWORD) as client:
            _poll(
                lambda: client.pubsub_numsub("gateway:token-changes")[0][1] == len(PROXIES),
                "both proxies subscribe to the Redis change channel",
            )


def _start(deployment: Deployment, name: str, command: str, host: Host, **settings: str) -> None:
    log = (host.directory / f"{name}.log").open("wb")
    deployment.processes[name] = subprocess.Popen(
        host.command(sys.executable, "-m", "gateway", command),
        cwd=host.directory,
        env=_environment(**settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()


def _upstream(address: str, port: int) -> subprocess.Popen[bytes]:
    """A real upstream on the test's own host: gateway.demo_upstream, which echoes each request."""
    code = (
        "import sys; from aiohttp import web; from gateway.demo_upstream import create_demo_upstream_app;"
        " web.run_app(create_demo_upstream_app(), host=sys.argv[1], port=int(sys.argv[2]), print=None)"
    )
    return subprocess.Popen([sys.executable, "-c", code, address, str(port)], cwd=ROOT)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    hosts = Hosts(tmp_path_factory.mktemp("hosts"))
    started: list[Callable[[], None]] = [hosts.close]
    try:
        database_host, cache_host, admin_host = hosts.host("db"), hosts.host("cache"), hosts.host("admin")
        proxy_hosts = {name: hosts.host(name) for name in PROXIES}

        postgres = PostgresServer(durable=True, host=database_host.address, wrapper=database_host.wrapper)
        started.append(postgres.remove)
        postgres.initialise()
        with (postgres.data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all samenet scram-sha-256\n")  # the other hosts, by password
        postgres.start()
        redis_server = RedisServer(
            cache_host.directory / "redis",
            host=cache_host.address,
            wrapper=cache_host.wrapper,
            password=REDIS_PASSWORD,
        )
        started.append(redis_server.kill)
        redis_server.start()

        upstream_port = free_port() if not hosts.isolated else 9000
        upstream = _upstream(hosts.client, upstream_port)
        started.append(lambda: _kill(upstream))

        def port(default: int) -> int:
            return default if hosts.isolated else free_port()

        admin_port = port(8081)
        proxy_ports = {name: port(8080) for name in PROXIES}
        deployment = Deployment(
            hosts,
            postgres,
            redis_server,
            f"http://{admin_host.address}:{admin_port}",
            {name: f"http://{proxy_hosts[name].address}:{proxy_ports[name]}" for name in PROXIES},
        )
        started.append(lambda: _stop_all(deployment))

        deployment.psql("-c", f"CREATE DATABASE {DATABASE}", url=postgres.url())
        deployment.psql(
            *(f"-v{role}_password={secret}" for role, secret in ROLE_PASSWORDS.items()),
            "-f",
            str(ROOT / "deploy/postgres/roles.sql"),
        )
        common = {
            "redis_url": redis_server.url,
            "argon2_time_cost": "1",
            "argon2_memory_cost_kib": "1024",
            "cache_ttl": "60",
            "shutdown_timeout": "1",
            "database_connect_timeout": "1",
            "database_statement_timeout": "2",
            "access_log": "false",
        }
        migrate = subprocess.run(
            admin_host.command(sys.executable, "-m", "gateway", "migrate"),
            cwd=admin_host.directory,
            env=_environment(database_url=deployment.role_url("migrate"), **common),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert migrate.returncode == 0, migrate.stderr
        deployment.psql("-f", str(ROOT / "deploy/postgres/grants.sql"), url=deployment.role_url("migrate"))

        _start(
            deployment,
            "admin",
            "admin",
            admin_host,
            database_url=deployment.role_url("admin"),
            admin_listen=f"{admin_host.address}:{admin_port}",
            admin_key=ADMIN_KEY,
            admin_allow_remote="true",  # a private network between the hosts, as the README describes
            **common,
        )
        for name in PROXIES:
            _start(
                deployment,
                name,
                "proxy",
                proxy_hosts[name],
                database_url=deployment.role_url("proxy"),
                upstream=f"http://{hosts.client}:{upstream_port}",
                proxy_listen=f"{proxy_hosts[name].address}:{proxy_ports[name]}",
                **common,
            )
        deployment.ready()
        yield deployment
    finally:
        for stop in reversed(started):
            stop()


def _kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()


def _stop_all(deployment: Deployment) -> None:
    for process in deployment.processes.values():
        if process.poll() is None:
            process.terminate()
    for process in deployment.processes.values():
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Client:
    """The test's own host: an operator's shell for the admin API, and integrations calling both proxies."""

    def __init__(self, deployment: Deployment, session: aiohttp.ClientSession) -> None:
        self.deployment = deployment
        self.session = session
        self.admin_headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    async def admin(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.session.request(
            method, self.deployment.admin_url + path, headers=self.admin_headers, **kwargs
        ) as response:
            text = await response.text()
            return response.status, (json.loads(text) if text else None)

    async def create(self, name: str) -> dict[str, Any]:
        status, body = await self.admin(
            "POST", "/v1/tokens", json={"name": name, "access_level": "read_only"}
        )
        assert status == 201, body
        return dict(body)

    async def call(self, proxy: str, token: str) -> tuple[int, str | None]:
        """The status and problem `code` (None for a success) one proxy answers for a token."""
        url = self.deployment.proxy_urls[proxy] + "/api/posts"
        async with self.session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
            body = await response.read()
            code = json.loads(body).get("code") if response.status >= 400 and body else None
            return response.status, code

    async def on_every_proxy(self, token: str) -> set[tuple[int, str | None]]:
        return {await self.call(proxy, token) for proxy in PROXIES}

    async def until_every_proxy(
        self, token: str, expected: tuple[int, str | None], attempts: int = 400
    ) -> None:
        for _ in range(attempts):
            if await self.on_every_proxy(token) == {expected}:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"the proxies answer {await self.on_every_proxy(token)}, not {expected}")


@pytest.fixture
async def client(deployment: Deployment) -> AsyncIterator[Client]:
    deployment.ready()  # a test before this one may have stopped and restarted a dependency
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True), trust_env=False
    ) as session:
        yield Client(deployment, session)


OK = (200, None)
INVALID = (401, "invalid_token")
DISABLED = (401, "token_disabled")


async def test_every_lifecycle_change_holds_on_both_proxies(deployment: Deployment, client: Client) -> None:
    print(
        "hosts are",
        "network namespaces" if deployment.hosts.isolated else "loopback addresses (not isolated)",
    )
    token = await client.create("crm")
    assert await client.on_every_proxy(token["token"]) == {OK}

    assert (await client.admin("POST", f"/v1/tokens/{token['id']}/disable"))[0] == 200
    await client.until_every_proxy(token["token"], DISABLED)
    assert (await client.admin("POST", f"/v1/tokens/{token['id']}/enable"))[0] == 200
    await client.until_every_proxy(token["token"], OK)

    status, rotated = await client.admin("POST", f"/v1/tokens/{token['id']}/rotate", json={})
    assert status == 200
    await client.until_every_proxy(token["token"], INVALID)
    await client.until_every_proxy(rotated["token"], OK)

    assert (await client.admin("DELETE", f"/v1/tokens/{token['id']}"))[0] == 204
    await client.until_every_proxy(rotated["token"], INVALID)


async def test_with_redis_stopped_disable_delete_and_rotate_reach_both_proxies_through_the_store(
    deployment: Deployment, client: Client
) -> None:
    disabled, deleted, rotated = [await client.create(name) for name in ("disabled", "deleted", "rotated")]
    for token in (disabled, deleted, rotated):
        assert await client.on_every_proxy(token["token"]) == {OK}  # now in every proxy's cache, for 60 s

    deployment.redis.kill()
    try:
        assert (await client.admin("POST", f"/v1/tokens/{disabled['id']}/disable"))[0] == 200
        assert (await client.admin("DELETE", f"/v1/tokens/{deleted['id']}"))[0] == 204
        status, new = await client.admin("POST", f"/v1/tokens/{rotated['id']}/rotate", json={})
        assert status == 200
        await client.until_every_proxy(disabled["token"], DISABLED)
        await client.until_every_proxy(deleted["token"], INVALID)
        await client.until_every_proxy(rotated["token"], INVALID)
        await client.until_every_proxy(new["token"], OK)
    finally:
        deployment.redis.start()
    deployment.ready()
    # Redis is back, and empty: the outbox is delivered to it, and the shared cache agrees with the store.
    for token, expected in ((disabled, DISABLED), (deleted, INVALID), (new, OK)):
        await client.until_every_proxy(token["token"], expected)


async def test_with_postgres_stopped_known_tokens_work_unknown_get_503_and_everything_recovers(
    deployment: Deployment, client: Client
) -> None:
    known = await client.create("known")
    refused = await client.create("refused")
    assert (await client.admin("POST", f"/v1/tokens/{refused['id']}/disable"))[0] == 200
    await client.until_every_proxy(known["token"], OK)
    await client.until_every_proxy(refused["token"], DISABLED)
    unknown = str(issue_token("gw", new_token_id()))  # well formed, in no cache and not in the store

    seen: list[tuple[str, tuple[int, str | None]]] = []
    stop = asyncio.Event()

    async def load() -> None:
        """Known tokens on both proxies all through the outage and the recovery."""
        while not stop.is_set():
            for proxy in PROXIES:
                seen.append(("known", await client.call(proxy, known["token"])))
                seen.append(("refused", await client.call(proxy, refused["token"])))
            await asyncio.sleep(0.01)

    running = asyncio.create_task(load())
    await asyncio.to_thread(deployment.postgres.stop, "immediate")
    try:
        assert await client.on_every_proxy(unknown) == {(503, "store_unavailable")}
        status, problem = await client.admin("GET", "/v1/tokens")
        assert (status, problem["code"]) == (503, "store_unavailable")
        status, problem = await client.admin(
            "POST", "/v1/tokens", json={"name": "lost", "access_level": "read_only"}
        )
        assert (status, problem["code"]) == (503, "store_unavailable")
        status, readiness = await client.admin("GET", "/readyz")
        assert (status, readiness["store"]) == (503, "unavailable")
    finally:
        await asyncio.to_thread(deployment.postgres.start)
    await asyncio.to_thread(deployment.ready)
    await client.until_every_proxy(unknown, INVALID)
    stop.set()
    await running

    assert {answer for name, answer in seen if name == "known"} == {OK}
    assert {answer for name, answer in seen if name == "refused"} == {DISABLED}
    status, listing = await client.admin("GET", "/v1/tokens", params={"limit": "200"})
    assert status == 200 and "lost" not in {item["name"] for item in listing["items"]}  # nothing half-written
    after = await client.create("after")
    await client.until_every_proxy(after["token"], OK)


async def test_the_proxy_role_reads_tokens_and_can_change_nothing_that_decides(
    deployment: Deployment,
) -> None:
    proxy = await asyncpg.connect(deployment.role_url("proxy"))
    try:
        await proxy.fetch("SELECT id, status, secret_hash FROM tokens LIMIT 1")
        for statement in (
            "UPDATE tokens SET status = 'enabled'",
            "UPDATE tokens SET secret_hash = 'x'",
            "INSERT INTO token_changes (token_id) VALUES ('x')",
            "DELETE FROM tokens",
            "SELECT * FROM audit_events",
            "CREATE TABLE intruder (id INT)",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await proxy.execute(statement)
    finally:
        await proxy.close()
    admin = await asyncpg.connect(deployment.role_url("admin"))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await admin.execute("CREATE TABLE intruder (id INT)")
    finally:
        await admin.close()


def test_no_host_has_a_store_file(deployment: Deployment) -> None:
    for name in ("admin", *PROXIES):
        files = {path.name for path in deployment.hosts.host(name).directory.rglob("*")}
        assert files == {f"{name}.log"}, files
