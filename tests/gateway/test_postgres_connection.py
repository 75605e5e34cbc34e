"""Connecting to PostgreSQL as configured: the password from the URL or its own setting, never shown; TLS
when the URL asks for it; a clear StoreUnavailable when the server cannot be used."""

from __future__ import annotations

import pytest

from gateway.core import create_store
from gateway.settings import load_settings
from gateway.store import StoreUnavailable
from tests.postgres_server import PASSWORD, PostgresServer

pytestmark = pytest.mark.parametrize("store_backend", ["postgresql"], indirect=True)



async def test_the_password_may_come_from_its_own_setting_and_never_shows(
    postgres_server: PostgresServer, database_url: str
) -> None:
    database = database_url.rsplit("/", 1)[1]
    settings = load_settings(
        environ={
            "GATEWAY_DATABASE_URL": postgres_server.url(database, password=False),
            "GATEWAY_DATABASE_PASSWORD": PASSWORD,
        }
    )
    assert PASSWORD not in repr(settings)
    store = create_store(settings, migrate=True)
    await store.open()
    try:
        await store.ping()
        assert PASSWORD not in repr(store)
    finally:
        await store.close()


async def test_a_wrong_password_is_refused_with_one_line_that_does_not_show_it(
    postgres_server: PostgresServer, database_url: str
) -> None:
    wrong = "not-the-password-4711"
    url = database_url.replace(PASSWORD, wrong)
    store = create_store(load_settings(environ={"GATEWAY_DATABASE_URL": url}), migrate=True)
    assert wrong not in repr(store) and "**********" in repr(store)
    with pytest.raises(StoreUnavailable) as refused:
        await store.open()
    assert "refused the connection" in str(refused.value) and wrong not in str(refused.value)


async def test_tls_is_required_when_the_url_asks_for_it(database_url: str) -> None:
    """The suite's server offers no TLS, so sslmode=require must refuse rather than fall back to plain text."""
    store = create_store(load_settings(environ={"GATEWAY_DATABASE_URL": f"{database_url}?sslmode=require"}))
    with pytest.raises(StoreUnavailable) as refused:
        await store.open()
    assert PASSWORD not in str(refused.value)


async def test_an_unreachable_server_is_store_unavailable(database_url: str) -> None:
    from tests.redis_server import free_port

    url = f"postgresql://gateway:{PASSWORD}@127.0.0.1:{free_port()}/nowhere"
    store = create_store(load_settings(environ={"GATEWAY_DATABASE_URL": url, "GATEWAY_DATABASE_CONNECT_TIMEOUT": "1"}))
    with pytest.raises(StoreUnavailable) as refused:
        await store.open()
    assert "cannot reach PostgreSQL" in str(refused.value) and PASSWORD not in str(refused.value)
