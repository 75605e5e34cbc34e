"""From a presented token string to a verified, usable token, or a 401 explaining as little as it must.

Unknown ids, wrong secrets and bad checksums all get the same `invalid_token`; only a caller holding the right
secret learns that the token is disabled or expired. argon2 runs once per secret per process: afterwards the
memo digest recognises the secret in about a microsecond. Wrong secrets are limited (failure_limits.py), but
never before a known-good secret has been accepted. A secret the cached entry refuses is judged again against
the store of record before it counts as wrong (TokenCache.recheck: one read per token per interval): after a
lost change notification the entry may hold the secrets from before a rotation.

The checksum turns away mistyped and forged strings before they can cost a store read. A string the memo
already recognises was checked when it was first verified (the memo digest covers the id and the whole
secret, checksum included, and the prefix is compared), so it skips the checksum.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from typing import NamedTuple

from gateway.credentials import invalid_token
from gateway.failure_limits import FailureLimits
from gateway.problems import GatewayError
from gateway.secrets import SecretHasher, digests_equal
from gateway.token_cache import CachedToken, TokenCache
from gateway.token_format import TokenString, checksum_matches, split_token


class IdentifiedToken(NamedTuple):
    token: TokenString
    digest: bytes  # the memo digest of the secret: what the cache entry's memo is compared with


class _Verdict(enum.Enum):
    MATCH = "match"
    WRONG = "wrong"  # argon2 said so just now: a failure, unless the store knows newer secrets
    KNOWN_WRONG = "known wrong"  # already counted against these hashes
    REVOKED = "revoked"  # a secret this token had and no longer accepts


def store_unavailable() -> GatewayError:
    return GatewayError(503, "store_unavailable", "The token store is not answering; try again shortly.")


def _token_refused(code: str, detail: str) -> GatewayError:
    header = f'Bearer realm="gateway", error="invalid_token", error_description="{detail}"'
    return GatewayError(401, code, detail, headers={"WWW-Authenticate": header})


def _check_usable(entry: CachedToken, clock: Callable[[], float]) -> None:
    """Only a caller holding the right secret gets here, so it may learn why the token is refused."""
    if not entry.enabled:
        raise _token_refused("token_disabled", "The token is disabled.")
    if entry.expires_at is not None and clock() >= entry.expires_at:
        raise _token_refused("token_expired", "The token has expired.")


def presented_previous(entry: CachedToken, digest: bytes) -> bool:
    """Whether the accepted secret was the previous one (in a rotation's grace): its use is tracked apart, so an
    admin sees when every integration has switched."""
    memo = entry.memo_previous
    return memo is not None and digests_equal(memo, digest)


class Authenticator:
    def __init__(
        self,
        cache: TokenCache,
        hasher: SecretHasher,
        *,
        prefix: str,
        limits: FailureLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` is the wall clock (unix seconds) that expiry and the end of a grace are judged by."""
        self._cache = cache
        self._hasher = hasher
        self._prefix = prefix
        self._limits = limits or FailureLimits()
        self._clock = clock

    def identify(self, presented: str) -> IdentifiedToken:
        """The token's parts and memo digest, without the checksum or the store: a caller that sees the same
        string again (the next request on a connection) can hand this back to `authenticate`."""
        token = split_token(presented, self._prefix)
        if token is None:
            raise invalid_token()
        return IdentifiedToken(token, self._hasher.memo_digest(token.token_id, token.secret))

    def accept_known(self, presented: IdentifiedToken) -> CachedToken | None:
        """The token at once, when its fresh cache entry already knows this secret (the steady state: no
        await, no store, no argon2); None when `authenticate` has to decide."""
        entry = self._cache.get_fresh(presented.token.token_id)
        if entry is None or not self._memo_accepts(entry, presented.digest):
            return None
        _check_usable(entry, self._clock)
        return entry

    async def authenticate(self, presented: str | IdentifiedToken, source: str) -> CachedToken:
        """The token, if `presented` is its current secret (or its previous one, in grace); `source` is the
        caller's address key, for limiting wrong secrets."""
        token, digest = self.identify(presented) if isinstance(presented, str) else presented
        known = self._cache.peek(token.token_id)
        if (known is None or not self._memo_accepts(known, digest)) and not checksum_matches(token):
            raise invalid_token()
        for _ in range(3):
            try:
                entry = await self._cache.get(token.token_id)
            except Exception:
                raise store_unavailable() from None
            if entry is None:
                raise invalid_token()
            verdict = await self._judge(entry, token, digest, source)
            if verdict is _Verdict.MATCH:
                break
            if self._cache.peek(token.token_id) is not entry:
                continue  # the token changed while argon2 ran: judge the secret against the new version
            if verdict is not _Verdict.REVOKED and await self._newer_in_store(entry, token, digest, source, verdict):
                continue  # the cache missed a change (a lost notification): judge against the store's version
            if verdict is _Verdict.WRONG:
                self._limits.record_failure(source, token.token_id, digest, self._hashes(entry))
            raise invalid_token()
        else:
            raise invalid_token()
        _check_usable(entry, self._clock)
        return entry

    async def _newer_in_store(
        self, entry: CachedToken, token: TokenString, digest: bytes, source: str, verdict: _Verdict
    ) -> bool:
        """Whether the store of record holds other secrets for this token than `entry` (then cached); bounded
        by the cache to one store read per token per interval, however many requests fail."""
        try:
            return await self._cache.recheck(entry) is not None
        except Exception:
            if verdict is _Verdict.WRONG:
                self._limits.record_failure(source, token.token_id, digest, self._hashes(entry))
            raise store_unavailable() from None

    def still_accepts(self, entry: CachedToken, presented: IdentifiedToken) -> bool:
        """Whether `entry`, the last version known, still lets this secret in now. For an open tunnel while the
        store cannot be read: expiry and the end of a grace period need no store."""
        try:
            _check_usable(entry, self._clock)
        except GatewayError:
            return False
        return self._memo_accepts(entry, presented.digest)

    def _memo_accepts(self, entry: CachedToken, digest: bytes) -> bool:
        return digests_equal(entry.memo_current, digest) or (
            digests_equal(entry.memo_previous, digest) and self._in_grace(entry)
        )

    def _hashes(self, entry: CachedToken) -> tuple[str, str | None]:
        """The hashes a secret is judged against now: a failure is remembered against exactly these."""
        return entry.record.secret_hash, entry.record.previous_secret_hash if self._in_grace(entry) else None

    async def _judge(self, entry: CachedToken, token: TokenString, digest: bytes, source: str) -> _Verdict:
        if digests_equal(entry.memo_current, digest):
            return _Verdict.MATCH
        if digests_equal(entry.memo_previous, digest):
            return _Verdict.MATCH if self._in_grace(entry) else _Verdict.REVOKED
        if any(digests_equal(revoked, digest) for revoked in entry.memo_revoked):
            return _Verdict.REVOKED  # a secret this process saw verified before a rotation replaced it
        if self._limits.known_wrong(digest, self._hashes(entry)):
            return _Verdict.KNOWN_WRONG
        pending = entry.verifications.get(digest)
        started = pending is None
        if pending is None:
            self._limits.check(source, token.token_id)
            pending = asyncio.ensure_future(self._verify(entry, token.secret, digest))
            entry.verifications[digest] = pending
            pending.add_done_callback(lambda _: entry.verifications.pop(digest, None))
        if await asyncio.shield(pending):
            return _Verdict.MATCH
        # One verification, one failure: requests that waited for another's verification are not counted.
        return _Verdict.WRONG if started else _Verdict.KNOWN_WRONG

    async def _verify(self, entry: CachedToken, secret: str, digest: bytes) -> bool:
        record = entry.record
        if await self._hasher.verify(record.secret_hash, secret):
            entry.memo_current = digest
            return True
        if record.previous_secret_hash is not None and self._in_grace(entry):
            if await self._hasher.verify(record.previous_secret_hash, secret):
                entry.memo_previous = digest
                return self._in_grace(entry)
        # Remembered at once, so a request arriving meanwhile costs no second argon2; it is counted as a
        # failure only once the store of record agrees (authenticate).
        self._limits.remember_wrong(digest, self._hashes(entry))
        return False

    def _in_grace(self, entry: CachedToken) -> bool:
        return entry.previous_secret_until is not None and self._clock() < entry.previous_secret_until
