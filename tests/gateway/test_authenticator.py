"""The authenticator on its own: a checksum keeps garbage from the store, and a warm secret skips it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import gateway.authenticator
from gateway.authenticator import Authenticator
from gateway.problems import GatewayError
from gateway.secrets import Argon2Parameters, SecretHasher
from gateway.store import SQLiteStore
from gateway.token_cache import TokenCache
from gateway.token_format import TokenString, checksum_matches, issue_token, new_token_id
from gateway.tokens import AuditEvent, TokenRecord, TokenStatus

PREFIX = "gw"
SOURCE = "192.0.2.1"


@dataclasses.dataclass
class Setup:
    store: SQLiteStore
    hasher: SecretHasher
    cache: TokenCache
    authenticator: Authenticator
    record: TokenRecord
    token: TokenString
    checksums: list[TokenString]


@pytest.fixture
async def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Setup]:
    store = SQLiteStore(tmp_path / "tokens.db")
    await store.open()
    hasher = SecretHasher(Argon2Parameters(time_cost=1, memory_cost_kib=64))
    token = issue_token(PREFIX, new_token_id())
    now = datetime.now(UTC)
    record = TokenRecord(
        id=token.token_id,
        name="test",
        access_level="read_only",
        allowed_ip_ranges=(),
        status=TokenStatus.ENABLED,
        expires_at=None,
        created_at=now,
        updated_at=now,
        rotated_at=None,
        last_used_at=None,
        last_used_ip=None,
        secret_hash=await hasher.hash(token.secret),
    )
    await store.insert_token(record, AuditEvent("token.create", "test", record.id, {}))
    checksums: list[TokenString] = []

    def counted_checksum(token: TokenString) -> bool:
        checksums.append(token)
        return checksum_matches(token)

    monkeypatch.setattr(gateway.authenticator, "checksum_matches", counted_checksum)
    cache = TokenCache(store, {})
    yield Setup(store, hasher, cache, Authenticator(cache, hasher, prefix=PREFIX), record, token, checksums)
    hasher.close()
    await store.close()


def _with_wrong_checksum(token: TokenString) -> str:
    last = token.secret[-1]
    return str(token)[:-1] + ("A" if last != "A" else "B")


async def _refusal(authenticator: Authenticator, presented: str) -> GatewayError:
    with pytest.raises(GatewayError) as refused:
        await authenticator.authenticate(presented, SOURCE)
    return refused.value


async def test_a_wrong_checksum_is_refused_without_reading_the_store(setup: Setup) -> None:
    reads = setup.store.reads

    error = await _refusal(setup.authenticator, _with_wrong_checksum(setup.token))

    assert (error.status, error.code) == (401, "invalid_token")
    assert setup.store.reads == reads
    assert setup.hasher.verify_calls == 0


async def test_a_wrong_checksum_is_refused_when_the_token_is_cached(setup: Setup) -> None:
    await setup.authenticator.authenticate(str(setup.token), SOURCE)
    reads, verifications = setup.store.reads, setup.hasher.verify_calls

    error = await _refusal(setup.authenticator, _with_wrong_checksum(setup.token))

    assert (error.status, error.code) == (401, "invalid_token")
    assert (setup.store.reads, setup.hasher.verify_calls) == (reads, verifications)


async def test_a_secret_already_verified_skips_the_checksum(setup: Setup) -> None:
    first = await setup.authenticator.authenticate(str(setup.token), SOURCE)
    assert len(setup.checksums) == 1

    for _ in range(3):
        assert await setup.authenticator.authenticate(str(setup.token), SOURCE) is first

    assert len(setup.checksums) == 1
    assert setup.hasher.verify_calls == 1


async def test_the_previous_secret_skips_the_checksum_only_in_grace(setup: Setup) -> None:
    await setup.authenticator.authenticate(str(setup.token), SOURCE)
    new_token = issue_token(PREFIX, setup.token.token_id)
    rotated = dataclasses.replace(
        setup.record,
        secret_hash=await setup.hasher.hash(new_token.secret),
        previous_secret_hash=setup.record.secret_hash,
        previous_secret_expires_at=datetime.now(UTC) + timedelta(hours=1),
        version=2,
    )
    setup.cache.apply(rotated)

    await setup.authenticator.authenticate(str(setup.token), SOURCE)
    assert (len(setup.checksums), setup.hasher.verify_calls) == (1, 1)

    expired = datetime.now(UTC) - timedelta(seconds=1)
    setup.cache.apply(dataclasses.replace(rotated, previous_secret_expires_at=expired, version=3))
    error = await _refusal(setup.authenticator, str(setup.token))

    assert (error.status, error.code) == (401, "invalid_token")
    assert len(setup.checksums) == 2


async def test_a_known_secret_of_a_disabled_token_is_told_so_without_the_checksum(setup: Setup) -> None:
    await setup.authenticator.authenticate(str(setup.token), SOURCE)
    setup.cache.apply(dataclasses.replace(setup.record, status=TokenStatus.DISABLED, version=2))

    error = await _refusal(setup.authenticator, str(setup.token))

    assert (error.status, error.code) == (401, "token_disabled")
    assert len(setup.checksums) == 1


async def test_an_unknown_id_with_a_valid_checksum_costs_one_store_read(setup: Setup) -> None:
    stranger = issue_token(PREFIX, new_token_id())
    reads = setup.store.reads

    for _ in range(3):
        error = await _refusal(setup.authenticator, str(stranger))
        assert (error.status, error.code) == (401, "invalid_token")

    assert setup.store.reads == reads + 1


async def test_accept_known_answers_a_warm_secret_at_once_and_defers_everything_else(setup: Setup) -> None:
    authenticator = setup.authenticator
    identified = authenticator.identify(str(setup.token))
    assert authenticator.accept_known(identified) is None  # cold: authenticate must decide (argon2)
    entry = await authenticator.authenticate(identified, SOURCE)
    reads, verifications = setup.store.reads, setup.hasher.verify_calls

    assert authenticator.accept_known(identified) is entry
    assert authenticator.accept_known(authenticator.identify(_with_wrong_checksum(setup.token))) is None
    assert (setup.store.reads, setup.hasher.verify_calls) == (reads, verifications)

    setup.cache.apply(dataclasses.replace(entry.record, status=TokenStatus.DISABLED, version=entry.record.version + 1))
    with pytest.raises(GatewayError) as refused:  # the memo carried over: the right secret learns why
        authenticator.accept_known(identified)
    assert refused.value.code == "token_disabled"
