"""The store interface, on each backend: a real SQLite file and a real PostgreSQL database.

Every behaviour the planes rely on holds on both: one transaction per change with its audit row and its
outbox row, paging newest first, usage that never moves back, no lost update under concurrent changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.settings import Secret
from gateway.store import (
    AdminKeyNotFound,
    InvalidCursor,
    LastAdminKey,
    SQLiteStore,
    TokenNotFound,
    TokenStore,
)
from gateway.store.postgres import PostgresStore
from gateway.tokens import AdminKeyRecord, AuditEvent, TokenRecord, TokenStatus
from tests.conftest import STORE_BACKENDS

pytestmark = pytest.mark.parametrize("store_backend", STORE_BACKENDS, indirect=True)

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def open_store(database_url: str, **options: bool) -> TokenStore:
    if database_url.startswith("sqlite:///"):
        return SQLiteStore(Path(database_url.removeprefix("sqlite:///")), **options)
    return PostgresStore(Secret(database_url), migrate=True, **options)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[TokenStore]:
    store = open_store(database_url, record_changes=True)
    await store.open()
    yield store
    await store.close()


def record(token_id: str, **fields: object) -> TokenRecord:
    values: dict[str, object] = {
        "id": token_id,
        "name": f"token {token_id}",
        "access_level": "read_only",
        "allowed_ip_ranges": ("10.0.0.0/8", "2001:db8::/32"),
        "status": TokenStatus.ENABLED,
        "expires_at": T0 + timedelta(days=30),
        "created_at": T0,
        "updated_at": T0,
        "rotated_at": None,
        "last_used_at": None,
        "last_used_ip": None,
        "secret_hash": "$argon2id$v=19$m=1024,t=1,p=1$c2FsdA$aGFzaA",
        **fields,
    }
    return TokenRecord(**values)  # type: ignore[arg-type]


def event(action: str, token_id: str | None) -> AuditEvent:
    return AuditEvent(action, "key:test", token_id, {"why": "a test"}, at=T0)


async def test_a_token_reads_back_exactly_as_written(store: TokenStore) -> None:
    written = record("a" * 16, previous_secret_hash="$argon2id$old", previous_secret_expires_at=T0, version=7)
    await store.insert_token(written, event("token.create", written.id))
    assert await store.get_token(written.id) == written
    assert await store.get_token("b" * 16) is None


async def test_listing_pages_newest_first_and_filters(store: TokenStore) -> None:
    for number in range(5):
        status = TokenStatus.DISABLED if number % 2 else TokenStatus.ENABLED
        used = T0 + timedelta(days=number) if number >= 3 else None
        await store.insert_token(record(f"{number:016d}", status=status, last_used_at=used), event("c", None))
    first, cursor = await store.list_tokens(limit=2)
    assert [token.id[-1] for token in first] == ["4", "3"] and cursor is not None
    second, cursor = await store.list_tokens(limit=2, cursor=cursor)
    third, end = await store.list_tokens(limit=2, cursor=cursor)
    assert [token.id[-1] for token in second + third] == ["2", "1", "0"] and end is None
    disabled, _ = await store.list_tokens(status=TokenStatus.DISABLED)
    assert [token.id[-1] for token in disabled] == ["3", "1"]
    unused, _ = await store.list_tokens(unused_since=T0 + timedelta(days=4))
    assert [token.id[-1] for token in unused] == ["3", "2", "1", "0"]
    with pytest.raises(InvalidCursor):
        await store.list_tokens(cursor="not-a-cursor")


async def test_a_change_writes_its_audit_event_and_outbox_row_in_one_transaction(store: TokenStore) -> None:
    token = record("c" * 16)
    await store.insert_token(token, event("token.create", token.id))
    await store.acknowledge_changes(10**9)

    def disable(current: TokenRecord) -> tuple[TokenRecord, AuditEvent]:
        changed = dataclasses.replace(current, status=TokenStatus.DISABLED, version=current.version + 1)
        return changed, event("token.disable", current.id)

    changed = await store.change_token(token.id, disable)
    assert changed.status is TokenStatus.DISABLED and await store.get_token(token.id) == changed
    events, _ = await store.list_audit(token_id=token.id)
    assert [item.action for item in events] == ["token.disable", "token.create"]
    assert [token_id for _, token_id in await store.pending_changes()] == [token.id]


async def test_a_change_that_fails_leaves_nothing_behind(store: TokenStore) -> None:
    token = record("d" * 16)
    await store.insert_token(token, event("token.create", token.id))
    await store.acknowledge_changes(10**9)

    def refuse(current: TokenRecord) -> tuple[TokenRecord, AuditEvent]:
        raise ValueError("refused")

    with pytest.raises(ValueError):
        await store.change_token(token.id, refuse)
    with pytest.raises(TokenNotFound):
        await store.change_token("e" * 16, refuse)
    assert await store.get_token(token.id) == token
    assert len((await store.list_audit())[0]) == 1 and await store.pending_changes() == []


async def test_concurrent_changes_to_one_token_lose_no_update(database_url: str, store: TokenStore) -> None:
    """Two store instances (two processes' worth of connections) each add to the version 20 times."""
    token = record("f" * 16)
    await store.insert_token(token, event("token.create", token.id))
    other = open_store(database_url, record_changes=True)
    await other.open()

    def bump(current: TokenRecord) -> tuple[TokenRecord, AuditEvent]:
        return dataclasses.replace(current, version=current.version + 1), event("token.edit", current.id)

    try:
        await asyncio.gather(*(each.change_token(token.id, bump) for each in (store, other) for _ in range(20)))
    finally:
        await other.close()
    stored = await store.get_token(token.id)
    assert stored is not None and stored.version == 41
    assert len((await store.list_audit(token_id=token.id, limit=100))[0]) == 41


async def test_delete_removes_the_token_and_records_it(store: TokenStore) -> None:
    token = record("g" * 16)
    await store.insert_token(token, event("token.create", token.id))
    await store.delete_token(token.id, event("token.delete", token.id))
    assert await store.get_token(token.id) is None
    with pytest.raises(TokenNotFound):
        await store.delete_token(token.id, event("token.delete", token.id))
    assert [item.action for item in (await store.list_audit())[0]] == ["token.delete", "token.create"]


async def test_usage_never_moves_a_last_used_time_backwards(store: TokenStore) -> None:
    token = record("h" * 16)
    await store.insert_token(token, event("token.create", token.id))
    later = T0 + timedelta(hours=1)
    await store.record_usage({token.id: (later, "10.0.0.1"), "i" * 16: (later, "10.0.0.9")})
    await store.record_usage({token.id: (T0, "10.0.0.2")})
    stored = await store.get_token(token.id)
    assert stored is not None and (stored.last_used_at, stored.last_used_ip) == (later, "10.0.0.1")


async def test_audit_pages_by_cursor(store: TokenStore) -> None:
    for number in range(3):
        await store.append_audit(event(f"action.{number}", None))
    first, cursor = await store.list_audit(limit=2)
    rest, end = await store.list_audit(limit=2, cursor=cursor)
    assert [item.action for item in first + rest] == ["action.2", "action.1", "action.0"] and end is None
    assert first[0].details == {"why": "a test"} and first[0].at == T0


async def test_the_last_admin_key_cannot_be_deleted(store: TokenStore) -> None:
    first = AdminKeyRecord("k1", "first", "admin", T0, "hash-1")
    second = AdminKeyRecord("k2", "second", "admin", T0 + timedelta(seconds=1), "hash-2")
    await store.put_admin_key(first)
    await store.put_admin_key(second, event("admin_key.create", None))
    await store.delete_admin_key("k1", event("admin_key.delete", None))
    with pytest.raises(LastAdminKey):
        await store.delete_admin_key("k2", event("admin_key.delete", None))
    with pytest.raises(AdminKeyNotFound):
        await store.delete_admin_key("k1", event("admin_key.delete", None))
    assert [key.id for key in await store.list_admin_keys()] == ["k2"]
