"""The authenticator on its own: a checksum keeps garbage from the store, and a warm secret skips it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import gateway.authenticator
from gateway.authenticator import Authenticator, presented_previous
from gateway.failure_limits import FailureLimits
from gateway.problems import GatewayError
from gateway.secrets import Argon2Parameters, SecretHasher
from gateway.store import SQLiteStore
from gateway.token_cache import TokenCache
from gateway.token_format import TokenString, checksum_matches, issue_token, new_token_id
from gateway.tokens import AuditEvent, TokenRecord, TokenStatus
from tests.conftest import GatedStore
from tests.gateway.test_store_down import ruin_sqlite_file

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


class Clock:
    """Unix seconds that move only when the test says so (whole seconds, so stamps convert back exactly)."""

    def __init__(self) -> None:
        self.now = float(int(datetime.now(UTC).timestamp()))

    def __call__(self) -> float:
        return self.now


def _authenticator(
    setup: Setup,
    *,
    clock: Clock | None = None,
    hasher: SecretHasher | None = None,
    origin: SQLiteStore | None = None,
    **limits: int,
) -> Authenticator:
    """Its own cache (memos live in the entries) and its own failure limits, on the setup's store."""
    cache = TokenCache(setup.store, {}, origin=origin)
    options = {"clock": clock} if clock is not None else {}
    return Authenticator(
        cache, hasher or setup.hasher, prefix=PREFIX, limits=FailureLimits(**limits), **options  # type: ignore[arg-type]
    )


def _wrong_secret(token: TokenString, n: int) -> str:
    """Another secret for the same id (the `n`th), with a valid checksum: only argon2 can refuse it."""
    return str(_WRONG.setdefault((token.token_id, n), issue_token(PREFIX, token.token_id)))


_WRONG: dict[tuple[str, int], TokenString] = {}


def _www_authenticate(error: GatewayError) -> str:
    return {name.lower(): value for name, value in (error.headers or {}).items()}["www-authenticate"]


async def _change(setup: Setup, **fields: object) -> TokenRecord:
    def change(current: TokenRecord) -> tuple[TokenRecord, AuditEvent]:
        return dataclasses.replace(current, version=current.version + 1, **fields), AuditEvent(  # type: ignore[arg-type]
            "token.update", "test", current.id, {}
        )

    return await setup.store.change_token(setup.record.id, change)


async def test_a_disabled_or_expired_token_says_which_in_its_detail_and_its_www_authenticate_header(
    setup: Setup,
) -> None:
    clock = Clock()
    authenticator = _authenticator(setup, clock=clock)
    await _change(setup, status=TokenStatus.DISABLED)
    error = await _refusal(authenticator, str(setup.token))
    assert (error.status, error.code, error.detail) == (401, "token_disabled", "The token is disabled.")
    assert _www_authenticate(error) == (
        'Bearer realm="gateway", error="invalid_token", error_description="The token is disabled."'
    )

    expired = await _change(setup, status=TokenStatus.ENABLED, expires_at=datetime.fromtimestamp(clock.now, UTC))
    authenticator = _authenticator(setup, clock=clock)
    error = await _refusal(authenticator, str(setup.token))
    assert (error.status, error.code, error.detail) == (401, "token_expired", "The token has expired.")
    assert _www_authenticate(error) == (
        'Bearer realm="gateway", error="invalid_token", error_description="The token has expired."'
    )
    assert expired.expires_at is not None


async def test_a_token_expires_at_its_expiry_to_the_microsecond(setup: Setup) -> None:
    clock = Clock()
    expires_at = datetime.fromtimestamp(round(clock.now) + 60, UTC)
    await _change(setup, expires_at=expires_at)
    authenticator = _authenticator(setup, clock=clock)
    identified = authenticator.identify(str(setup.token))

    clock.now = expires_at.timestamp() - 0.000001
    entry = await authenticator.authenticate(identified, SOURCE)
    assert authenticator.accept_known(identified) is entry
    assert authenticator.still_accepts(entry, identified)

    clock.now = expires_at.timestamp()
    error = await _refusal(authenticator, str(setup.token))
    assert (error.status, error.code) == (401, "token_expired")
    with pytest.raises(GatewayError) as refused:
        authenticator.accept_known(identified)
    assert refused.value.code == "token_expired"
    assert not authenticator.still_accepts(entry, identified)


async def test_an_open_tunnel_is_still_accepted_only_with_its_secret_while_usable(setup: Setup) -> None:
    """still_accepts judges from the entry alone (the store may be down): secret, status, expiry and grace."""
    clock = Clock()
    authenticator = _authenticator(setup, clock=clock)
    cache = authenticator._cache
    identified = authenticator.identify(str(setup.token))
    entry = await authenticator.authenticate(identified, SOURCE)
    assert authenticator.still_accepts(entry, identified)
    assert not authenticator.still_accepts(entry, authenticator.identify(_wrong_secret(setup.token, 1)))
    assert setup.hasher.verify_calls == 1  # judged by the memo, never by argon2

    cache.apply(dataclasses.replace(entry.record, status=TokenStatus.DISABLED, version=entry.record.version + 1))
    disabled = cache.peek(setup.token.token_id)
    assert disabled is not None and disabled.memo_current == identified.digest
    assert not authenticator.still_accepts(disabled, identified)

    new_token = issue_token(PREFIX, setup.token.token_id)
    rotated = await _change(
        setup,
        secret_hash=await setup.hasher.hash(new_token.secret),
        previous_secret_hash=setup.record.secret_hash,
        previous_secret_expires_at=datetime.fromtimestamp(clock.now + 60, UTC),
    )
    cache.apply(rotated)
    in_grace = await authenticator.authenticate(identified, SOURCE)
    assert authenticator.still_accepts(in_grace, identified)
    clock.now += 60
    assert not authenticator.still_accepts(in_grace, identified)


async def test_the_previous_secret_is_told_apart_from_the_current_one(setup: Setup) -> None:
    """What the proxy counts as use of the previous secret, for the admin to see when every client switched."""
    authenticator = _authenticator(setup)
    old = authenticator.identify(str(setup.token))
    before = await authenticator.authenticate(old, SOURCE)
    assert not presented_previous(before, old.digest)  # no rotation yet: it is the current secret
    new_token = issue_token(PREFIX, setup.token.token_id)
    new = authenticator.identify(str(new_token))
    rotated = await _change(
        setup,
        secret_hash=await setup.hasher.hash(new_token.secret),
        previous_secret_hash=setup.record.secret_hash,
        previous_secret_expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    authenticator._cache.apply(rotated)

    entry = await authenticator.authenticate(new, SOURCE)
    assert not presented_previous(entry, new.digest)
    entry = await authenticator.authenticate(old, SOURCE)
    assert presented_previous(entry, old.digest)
    assert not presented_previous(entry, new.digest)


async def test_a_wrong_secret_while_the_store_is_down_is_a_503_and_still_counts_against_the_source(
    setup: Setup, tmp_path: Path
) -> None:
    authenticator = _authenticator(setup, per_source=1)
    await authenticator.authenticate(str(setup.token), SOURCE)  # cached: the recheck must read the store
    ruin_sqlite_file(tmp_path / "tokens.db")

    error = await _refusal(authenticator, _wrong_secret(setup.token, 1))

    assert (error.status, error.code, error.detail) == (
        503, "store_unavailable", "The token store is not answering; try again shortly."
    )
    error = await _refusal(authenticator, _wrong_secret(setup.token, 2))
    assert (error.status, error.code) == (429, "too_many_failures")
    assert setup.hasher.verify_calls == 2  # the second was refused before argon2
    assert (await authenticator.authenticate(str(setup.token), SOURCE)).record.id == setup.token.token_id


async def test_a_wrong_secret_while_the_store_is_down_still_counts_against_the_token(
    setup: Setup, tmp_path: Path
) -> None:
    authenticator = _authenticator(setup, per_token=1)
    await authenticator.authenticate(str(setup.token), SOURCE)
    ruin_sqlite_file(tmp_path / "tokens.db")

    assert (await _refusal(authenticator, _wrong_secret(setup.token, 1))).code == "store_unavailable"
    with pytest.raises(GatewayError) as refused:
        await authenticator.authenticate(_wrong_secret(setup.token, 2), "198.51.100.7")
    assert (refused.value.status, refused.value.code) == (429, "too_many_failures")


async def test_a_wrong_secret_refused_while_the_store_is_down_costs_no_second_argon2(
    setup: Setup, tmp_path: Path
) -> None:
    authenticator = _authenticator(setup, remembered_failures=1)
    await authenticator.authenticate(str(setup.token), SOURCE)
    ruin_sqlite_file(tmp_path / "tokens.db")
    wrong = _wrong_secret(setup.token, 1)
    assert (await _refusal(authenticator, wrong)).code == "store_unavailable"
    verifications = setup.hasher.verify_calls

    error = await _refusal(authenticator, wrong)

    assert error.code in ("invalid_token", "store_unavailable")
    assert setup.hasher.verify_calls == verifications


async def test_a_wrong_secret_forgotten_by_the_failure_memory_is_verified_and_counted_again(setup: Setup) -> None:
    """The memory of wrong secrets is bounded; a verification in flight is shared, but not kept once done."""
    authenticator = _authenticator(setup, remembered_failures=1, per_source=3)
    first, second = _wrong_secret(setup.token, 1), _wrong_secret(setup.token, 2)
    for presented in (first, second, first):
        assert (await _refusal(authenticator, presented)).code == "invalid_token"
    assert setup.hasher.verify_calls == 3
    assert (await _refusal(authenticator, _wrong_secret(setup.token, 3))).code == "too_many_failures"


async def test_a_wrong_secret_remembered_during_a_grace_is_judged_again_once_the_grace_ends(setup: Setup) -> None:
    """It failed against the current and the previous hash; once the grace ends only the current one counts,
    so the failure memory must not answer for a set of hashes that no longer holds."""
    clock = Clock()
    authenticator = _authenticator(setup, clock=clock)
    new_token = issue_token(PREFIX, setup.token.token_id)
    await _change(
        setup,
        secret_hash=await setup.hasher.hash(new_token.secret),
        previous_secret_hash=setup.record.secret_hash,
        previous_secret_expires_at=datetime.fromtimestamp(clock.now + 60, UTC),
    )
    wrong = _wrong_secret(setup.token, 1)
    assert (await _refusal(authenticator, wrong)).code == "invalid_token"
    assert setup.hasher.verify_calls == 2  # the current hash, then the previous one
    assert (await _refusal(authenticator, wrong)).code == "invalid_token"
    assert setup.hasher.verify_calls == 2  # remembered

    clock.now += 60
    assert (await _refusal(authenticator, wrong)).code == "invalid_token"
    assert setup.hasher.verify_calls == 3  # the current hash alone
    assert (await _refusal(authenticator, str(setup.token))).code == "invalid_token"  # the grace has ended


class ChangingHasher(SecretHasher):
    """The real hasher, which lets the test commit a change while argon2 runs (as another request could)."""

    def __init__(self, parameters: Argon2Parameters) -> None:
        super().__init__(parameters)
        self.during_verifications: list[Callable[[], Awaitable[None]]] = []

    async def verify(self, secret_hash: str, secret: str) -> bool:
        verdict = await super().verify(secret_hash, secret)
        if self.during_verifications:
            await self.during_verifications.pop(0)()
        return verdict


async def test_a_wrong_secret_is_refused_when_the_token_changes_while_argon2_judges_it(setup: Setup) -> None:
    hasher = ChangingHasher(Argon2Parameters(time_cost=1, memory_cost_kib=64))
    try:
        authenticator = _authenticator(setup, hasher=hasher)
        await authenticator.authenticate(str(setup.token), SOURCE)

        async def renamed() -> None:
            authenticator._cache.apply(await _change(setup, name="renamed"))

        hasher.during_verifications = [renamed]
        error = await _refusal(authenticator, _wrong_secret(setup.token, 1))

        assert (error.status, error.code) == (401, "invalid_token")
        # The new version has the same hashes: the secret, remembered wrong against them, costs no second argon2.
        assert hasher.verify_calls == 2
    finally:
        hasher.close()


async def test_a_wrong_secret_is_refused_when_the_store_holds_secrets_the_cache_missed(setup: Setup) -> None:
    authenticator = _authenticator(setup)
    await authenticator.authenticate(str(setup.token), SOURCE)
    new_token = issue_token(PREFIX, setup.token.token_id)
    await _change(setup, secret_hash=await setup.hasher.hash(new_token.secret))  # the notification was lost

    error = await _refusal(authenticator, _wrong_secret(setup.token, 1))

    assert (error.status, error.code) == (401, "invalid_token")
    assert (await authenticator.authenticate(str(new_token), SOURCE)).record.id == setup.token.token_id


async def test_a_wrong_secret_presented_twice_costs_one_argon2_even_with_room_for_one_failure(setup: Setup) -> None:
    authenticator = _authenticator(setup, remembered_failures=1)
    wrong = _wrong_secret(setup.token, 1)
    for _ in range(3):
        assert (await _refusal(authenticator, wrong)).code == "invalid_token"
    assert setup.hasher.verify_calls == 1


async def test_concurrent_requests_with_one_wrong_secret_count_as_one_failure(setup: Setup) -> None:
    authenticator = _authenticator(setup, per_source=2)
    wrong = _wrong_secret(setup.token, 1)
    refusals = await asyncio.gather(*(_refusal(authenticator, wrong) for _ in range(3)))
    assert [error.code for error in refusals] == ["invalid_token"] * 3
    assert setup.hasher.verify_calls == 1

    assert (await _refusal(authenticator, _wrong_secret(setup.token, 2))).code == "invalid_token"  # the 2nd failure
    assert (await _refusal(authenticator, _wrong_secret(setup.token, 3))).code == "too_many_failures"


async def test_a_request_arriving_while_a_wrong_secret_is_rechecked_costs_no_second_argon2(
    setup: Setup, tmp_path: Path
) -> None:
    gated = GatedStore(tmp_path / "tokens.db")
    await gated.open()
    try:
        authenticator = _authenticator(setup, origin=gated)
        await authenticator.authenticate(str(setup.token), SOURCE)
        wrong = _wrong_secret(setup.token, 1)

        first = asyncio.ensure_future(_refusal(authenticator, wrong))
        await gated.read_done.wait()  # argon2 said wrong; the store of record is being asked for newer secrets
        second = asyncio.ensure_future(_refusal(authenticator, wrong))
        for _ in range(5):
            await asyncio.sleep(0)
        gated.gate.set()

        assert [(await first).code, (await second).code] == ["invalid_token", "invalid_token"]
        assert setup.hasher.verify_calls == 2  # the right secret once, the wrong one once
    finally:
        await gated.close()


async def test_a_fresh_process_judges_the_previous_secret_after_its_grace_against_the_current_hash_alone(
    setup: Setup,
) -> None:
    clock = Clock()
    new_token = issue_token(PREFIX, setup.token.token_id)
    await _change(
        setup,
        secret_hash=await setup.hasher.hash(new_token.secret),
        previous_secret_hash=setup.record.secret_hash,
        previous_secret_expires_at=datetime.fromtimestamp(clock.now, UTC),  # ends now
    )
    authenticator = _authenticator(setup, clock=clock)

    assert (await _refusal(authenticator, str(setup.token))).code == "invalid_token"
    assert setup.hasher.verify_calls == 1
    assert (await _refusal(authenticator, str(setup.token))).code == "invalid_token"
    assert setup.hasher.verify_calls == 1


async def test_the_previous_secret_in_its_grace_costs_argon2_once_then_is_known(setup: Setup) -> None:
    clock = Clock()
    new_token = issue_token(PREFIX, setup.token.token_id)
    await _change(
        setup,
        secret_hash=await setup.hasher.hash(new_token.secret),
        previous_secret_hash=setup.record.secret_hash,
        previous_secret_expires_at=datetime.fromtimestamp(clock.now + 1, UTC),
    )
    authenticator = _authenticator(setup, clock=clock)
    identified = authenticator.identify(str(setup.token))

    for _ in range(3):
        entry = await authenticator.authenticate(identified, SOURCE)
    assert setup.hasher.verify_calls == 2  # against the current hash, then the previous one: once
    assert authenticator.accept_known(identified) is entry

    clock.now += 1 - 0.000001
    assert authenticator.accept_known(identified) is entry
    clock.now = clock.now + 0.000001
    assert authenticator.accept_known(identified) is None  # the grace ends at its stamp exactly
    assert (await _refusal(authenticator, str(setup.token))).code == "invalid_token"


async def test_a_secret_is_judged_against_at_most_three_versions_of_a_token_changing_meanwhile(setup: Setup) -> None:
    """A token rotated during each verification is not chased forever: after three versions, the request is
    refused, even though the secret is right for the fourth."""
    hasher = ChangingHasher(Argon2Parameters(time_cost=1, memory_cost_kib=64))
    try:
        authenticator = _authenticator(setup, hasher=hasher)
        await authenticator.authenticate(str(setup.token), SOURCE)
        secrets = [issue_token(PREFIX, setup.token.token_id) for _ in range(3)]

        def rotation_to(secret: TokenString) -> Callable[[], Awaitable[None]]:
            async def rotate() -> None:
                authenticator._cache.apply(await _change(setup, secret_hash=await setup.hasher.hash(secret.secret)))

            return rotate

        hasher.during_verifications = [rotation_to(secret) for secret in secrets]
        final = secrets[-1]
        error = await _refusal(authenticator, str(final))

        assert (error.status, error.code) == (401, "invalid_token")
        assert hasher.verify_calls == 4  # the first secret, then the last one against three versions
        assert (await authenticator.authenticate(str(final), SOURCE)).record.version == 4
    finally:
        hasher.close()
