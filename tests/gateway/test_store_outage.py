"""PostgreSQL stopped under a running gateway, then started again: known tokens keep working from the cache,
unknown ones get 503 `store_unavailable`, the admin API answers 503 problem+json and writes nothing, and
everything recovers by itself when the database is back. The server is this module's own, so stopping it
disturbs no other test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from tests.admin_api.conftest import expect_problem
from tests.conftest import Gateway, GatewayFactory, eventually
from tests.postgres_server import PostgresServer


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(durable=True)  # an immediate stop must not lose committed changes
    try:
        server.initialise()
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
async def outage_gateway(own_postgres: PostgresServer, start_gateway: GatewayFactory) -> AsyncIterator[Gateway]:
    connection = await asyncpg.connect(own_postgres.url())
    try:
        await connection.execute("DROP DATABASE IF EXISTS outage WITH (FORCE)")
        await connection.execute("CREATE DATABASE outage TEMPLATE template0")
    finally:
        await connection.close()
    yield await start_gateway(database_url=own_postgres.url("outage"), database_connect_timeout=1.0)


async def test_a_postgres_outage_keeps_known_tokens_working_and_recovers_by_itself(
    own_postgres: PostgresServer, outage_gateway: Gateway, start_gateway: GatewayFactory
) -> None:
    gateway = outage_gateway
    known = await gateway.create_token(name="known")
    other_admin = await start_gateway(("admin",), database_url=own_postgres.url("outage"))
    unseen = await other_admin.create_token(name="unseen")  # this gateway has never seen it
    assert (await gateway.call(known["token"])).status == 200

    own_postgres.stop()
    try:
        assert (await gateway.call(known["token"])).status == 200  # from the cache
        await expect_problem(await gateway.call(unseen["token"]), 503, "store_unavailable")
        listing = await gateway.admin.get("/v1/tokens", headers=gateway.admin_headers)
        await expect_problem(listing, 503, "store_unavailable")
        created = await gateway.admin.post("/v1/tokens", json={"name": "lost", "access_level": "read_only"}, headers=gateway.admin_headers)
        await expect_problem(created, 503, "store_unavailable")
        ready = await gateway.admin.get("/readyz")
        assert ready.status == 503 and (await ready.json())["store"] == "unavailable"
    finally:
        own_postgres.start()

    async def admin_answers() -> bool:
        return (await gateway.admin.get("/v1/tokens", headers=gateway.admin_headers)).status == 200

    await eventually(admin_answers)
    assert (await gateway.call(unseen["token"])).status == 200
    assert (await gateway.admin.get("/readyz")).status == 200
    status, listing = await gateway.admin_call("GET", "/v1/tokens")
    assert sorted(item["name"] for item in listing["items"]) == ["known", "unseen"]  # nothing half-written
    status, audit = await gateway.admin_call("GET", "/v1/audit")
    assert [event["action"] for event in audit["items"]].count("token.create") == 2


async def test_a_change_during_an_outage_is_refused_and_leaves_the_token_as_it_was(
    own_postgres: PostgresServer, outage_gateway: Gateway
) -> None:
    gateway = outage_gateway
    token = await gateway.create_token(name="steady")
    own_postgres.stop("immediate")
    try:
        response = await gateway.admin.post(f"/v1/tokens/{token['id']}/disable", headers=gateway.admin_headers)
        await expect_problem(response, 503, "store_unavailable")
        assert (await gateway.call(token["token"])).status == 200
    finally:
        own_postgres.start()

    async def enabled() -> bool:
        response = await gateway.admin.get(f"/v1/tokens/{token['id']}", headers=gateway.admin_headers)
        return response.status == 200 and (await response.json())["status"] == "enabled"

    await eventually(enabled)
