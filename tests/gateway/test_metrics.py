"""/metrics after real traffic: the counts a scraper sees, who may read them, and that no secret is in them."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp
from pytest_aiohttp import AiohttpClient

from gateway import __version__
from gateway.metrics.listener import create_metrics_app
from tests.conftest import ADMIN_KEY, Gateway, GatewayFactory, Upstream, eventually

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> Samples:
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match is not None, line
        name, labels, value = match.groups()
        samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(gateway: Gateway) -> tuple[str, Samples]:
    response = await gateway.admin.get("/metrics", headers=gateway.admin_headers)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = await response.text()
    return text, parse(text)


async def test_a_scrape_after_real_traffic_counts_requests_lookups_and_argon2(
    gateway: Gateway, upstream: Upstream
) -> None:
    token = (await gateway.create_token(access_level="read_only"))["token"]
    _, before = await scrape(gateway)
    for path in ("/api/posts", "/api/posts?page=2", "/api/users"):
        assert (await gateway.call(token, path)).status == 200
    assert (await gateway.call(token, "/api/posts", method="DELETE")).status == 403
    assert (await gateway.call(None)).status == 401
    assert (await gateway.call("gw_0000000000000000_notachecksummedsecret")).status == 401
    assert (await gateway.call(None, "/.gateway/health")).status == 200
    _, after = await scrape(gateway)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("gateway_requests_total", code="ok", status_class="2xx") == 3
    assert delta("gateway_requests_total", code="insufficient_access_level", status_class="4xx") == 1
    assert delta("gateway_requests_total", code="missing_credentials", status_class="4xx") == 1
    assert delta("gateway_requests_total", code="invalid_token", status_class="4xx") == 1
    assert delta("gateway_requests_total", code="health", status_class="2xx") == 1
    assert delta("gateway_request_gateway_seconds_count") == 7
    assert delta("gateway_request_gateway_seconds_bucket", le="+Inf") == 7
    assert delta("gateway_request_upstream_seconds_count") == 3
    assert len(upstream.requests) == 3
    assert delta("gateway_argon2_verifications_total") == 1  # once per secret per process, then the memo
    assert delta("gateway_store_token_reads_total") == 0  # the new token was written through to the cache
    assert delta("gateway_token_lookups_total", layer="process", result="miss") == 0
    assert delta("gateway_token_lookups_total", layer="process", result="hit") >= 4
    assert value(after, "gateway_build_info", version=__version__, python=sys.version.split()[0]) == 1
    assert value(after, "gateway_dependency_up", dependency="store") == 1
    assert value(after, "gateway_undelivered_changes") == 0
    assert value(after, "gateway_client_connections") >= 1
    assert value(after, "gateway_upstream_connections") >= 1
    assert not any(name == "gateway_token_requests_total" for name, _ in after)


async def test_a_restarted_process_reads_the_store_once_per_token(start_gateway: GatewayFactory) -> None:
    first = await start_gateway()
    token = (await first.create_token())["token"]
    await first.close()
    gateway = await start_gateway()
    for _ in range(3):
        assert (await gateway.call(token)).status == 200
    _, samples = await scrape(gateway)
    assert value(samples, "gateway_store_token_reads_total") == 1
    assert value(samples, "gateway_token_lookups_total", layer="process", result="miss") == 1
    assert value(samples, "gateway_token_lookups_total", layer="store", result="hit") == 1
    assert value(samples, "gateway_requests_total", code="ok", status_class="2xx") == 3


async def test_metrics_need_an_admin_key_of_any_role_unless_public(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway()
    response = await gateway.admin.get("/metrics")
    assert response.status == 401 and (await response.json())["code"] == "missing_credentials"
    status, viewer = await gateway.admin_call(
        "POST", "/v1/admin-keys", json={"name": "scraper", "role": "viewer"}
    )
    assert status == 201
    response = await gateway.admin.get("/metrics", headers={"Authorization": f"Bearer {viewer['key']}"})
    assert response.status == 200
    await gateway.close()

    public = await start_gateway(metrics_public=True)
    assert (await public.admin.get("/metrics")).status == 200


async def test_metrics_never_contain_a_secret(start_gateway: GatewayFactory, redis_url: str) -> None:
    gateway = await start_gateway(metrics_token_labels=True, redis_url=redis_url)
    created = await gateway.create_token()
    token = created["token"]
    assert (await gateway.call(token)).status == 200
    assert (await gateway.call(token[:-3] + "abc")).status == 401
    text, samples = await scrape(gateway)
    assert value(samples, "gateway_token_requests_total", token_id=created["id"], status_class="2xx") == 1
    record = await gateway.core.store.get_token(created["id"])
    assert record is not None
    for secret in (token, token.rpartition("_")[2], ADMIN_KEY, record.secret_hash, "$argon2"):
        assert secret not in text


async def test_a_proxy_process_counts_redis_lookups_and_change_propagation(
    start_gateway: GatewayFactory, redis_url: str, aiohttp_client: AiohttpClient
) -> None:
    admin = await start_gateway(planes=("admin",), redis_url=redis_url)
    proxy = await start_gateway(planes=("proxy",), redis_url=redis_url)
    scraper = await aiohttp_client(create_metrics_app(proxy.core, None))
    created = await admin.create_token()
    for _ in range(2):
        assert (await proxy.call(created["token"])).status == 200

    async def samples() -> Samples:
        response = await scraper.get("/metrics")
        assert response.status == 200
        return parse(await response.text())

    first = await samples()
    assert value(first, "gateway_token_lookups_total", layer="redis", result="hit") == 1
    assert value(first, "gateway_store_token_reads_total") == 0  # the admin process wrote Redis through
    assert value(first, "gateway_dependency_up", dependency="redis") == 1
    assert value(first, "gateway_requests_total", code="ok", status_class="2xx") == 2
    # The creation was announced too, and may have been heard by now.
    heard_before = value(first, "gateway_change_propagation_seconds_count")

    status, _ = await admin.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    assert status == 200

    async def heard() -> bool:
        return value(await samples(), "gateway_change_propagation_seconds_count") == heard_before + 1

    await eventually(heard)
    assert (await proxy.call(created["token"])).status == 401


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_port_pair() -> int:
    """A port p such that p and p + 1 are both free now."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two consecutive free ports")


async def test_every_proxy_worker_serves_its_own_numbers(
    tmp_path: Path, upstream: Upstream, redis_url: str
) -> None:
    metrics_port = _free_port_pair()
    proxy_port, admin_port = _free_port(), _free_port()
    while {proxy_port, admin_port} & {metrics_port, metrics_port + 1}:
        proxy_port, admin_port = _free_port(), _free_port()
    environment = {key: item for key, item in os.environ.items() if not key.startswith("GATEWAY_")}
    environment.update(
        GATEWAY_UPSTREAM=upstream.url,
        GATEWAY_REDIS_URL=redis_url,
        GATEWAY_ADMIN_KEY=ADMIN_KEY,
        GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}",
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
        GATEWAY_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        GATEWAY_DATABASE_URL=f"sqlite:///{tmp_path / 'workers.db'}",
        GATEWAY_ACCESS_LOG="false",
        GATEWAY_ARGON2_TIME_COST="1",
        GATEWAY_ARGON2_MEMORY_COST_KIB="1024",
    )
    admin_environment = dict(environment)
    del admin_environment["GATEWAY_METRICS_LISTEN"]
    admin = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "admin", env=admin_environment
    )
    proxy = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "proxy", "--workers", "2", env=environment
    )
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        async with aiohttp.ClientSession() as session:

            async def answers(url: str, **kwargs: object) -> int:
                try:
                    async with session.get(url, **kwargs) as response:  # type: ignore[arg-type]
                        await response.read()
                        return response.status
                except aiohttp.ClientConnectionError:
                    return 0

            worker_urls = [f"http://127.0.0.1:{metrics_port + n}/metrics" for n in range(2)]
            for url in [f"http://127.0.0.1:{admin_port}/readyz", *worker_urls]:

                async def up(url: str = url) -> bool:
                    return await answers(url, headers=headers) == 200

                await eventually(up, attempts=1200, pause=0.05)
            assert await answers(worker_urls[0]) == 401  # not public: an admin key is needed

            async with session.post(
                f"http://127.0.0.1:{admin_port}/v1/tokens",
                json={"name": "workers", "access_level": "read_only"},
                headers=headers,
            ) as response:
                token = (await response.json())["token"]
            sent = 40
            for _ in range(sent):
                # A new connection each time, so the kernel spreads them over both workers.
                async with aiohttp.ClientSession() as fresh:
                    async with fresh.get(
                        f"http://127.0.0.1:{proxy_port}/api/x", headers={"Authorization": f"Bearer {token}"}
                    ) as response:
                        assert response.status == 200
            counts = []
            for url in worker_urls:
                async with session.get(url, headers=headers) as response:
                    samples = parse(await response.text())
                counts.append(value(samples, "gateway_requests_total", code="ok", status_class="2xx"))
            assert sum(counts) == sent
    finally:
        for process in (proxy, admin):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in (proxy, admin):
            try:
                await asyncio.wait_for(process.wait(), timeout=30)
            except TimeoutError:
                process.kill()
                await process.wait()
