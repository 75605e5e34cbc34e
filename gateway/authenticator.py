"""From a presented token string to a verified, usable token, or a 401 explaining as little as it must.

Unknown ids, wrong secrets and bad checksums all get the same `invalid_token`; only a caller holding the right
secret learns that the token is disabled or expired. argon2 runs once per secret per process: afterwards the
memo digest recognises the secret in about a microsecond. Wrong secrets are limited (failure_limits.py), but
never before a known-good secret has been accepted.

The checksum turns away mistyped and forged strings before they can cost a store read. A string the memo
already recognises was checked when it was first verified (the memo digest covers the id and the whole
secret, checksum included, and the prefix is compared), so it skips the checksum.
"""

from __future__ import annotations

import asyncio
import time
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


def _token_refused(code: str, detail: str) -> GatewayError:
    header = f'Bearer realm="gateway", error="invalid_token", error_description="{detail}"'
    return GatewayError(401, code, detail, headers={"WWW-Authenticate": header})


def _check_usable(entry: CachedToken) -> None:
    """Only a caller holding the right secret gets here, so it may learn why the token is refused."""
    if not entry.enabled:
        raise _token_refused("token_disabled", "The token is disabled.")
    if entry.expires_at is not None and time.time() >= entry.expires_at:
        raise _token_refused("token_expired", "The token has expired.")


class Authenticator:
    def __init__(
        self, cache: TokenCache, hasher: SecretHasher, *, prefix: str, limits: FailureLimits | None = None
    ) -> None:
        self._cache = cache
        self._hasher = hasher
        self._prefix = prefix
        self._limits = limits or FailureLimits()

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
        _check_usable(entry)
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
                raise GatewayError(
                    503, "store_unavailable", "The token store is not answering; try again shortly."
                ) from None
            if entry is None:
                raise invalid_token()
            if await self._secret_matches(entry, token, digest, source):
                break
            if self._cache.peek(token.token_id) is entry:
                raise invalid_token()
            # The token changed while argon2 ran: judge the secret against the new version.
        else:
            raise invalid_token()
        _check_usable(entry)
        return entry

    def _memo_accepts(self, entry: CachedToken, digest: bytes) -> bool:
        return digests_equal(entry.memo_current, digest) or (
            digests_equal(entry.memo_previous, digest) and self._in_grace(entry)
        )

    async def _secret_matches(
        self, entry: CachedToken, token: TokenString, digest: bytes, source: str
    ) -> bool:
        if digests_equal(entry.memo_current, digest):
            return True
        if digests_equal(entry.memo_previous, digest):
            return self._in_grace(entry)
        if any(digests_equal(revoked, digest) for revoked in entry.memo_revoked):
            return False  # a secret this process saw verified before a rotation replaced it
        hashes = (entry.record.secret_hash, entry.record.previous_secret_hash if self._in_grace(entry) else None)
        if self._limits.known_wrong(digest, hashes):
            return False
        pending = entry.verifications.get(digest)
        if pending is None:
            self._limits.check(source, token.token_id)
            pending = asyncio.ensure_future(self._verify(entry, token.secret, digest))
            entry.verifications[digest] = pending
            pending.add_done_callback(lambda _: entry.verifications.pop(digest, None))
        matched = await asyncio.shield(pending)
        if not matched:
            self._limits.record_failure(source, token.token_id, digest, hashes)
        return matched

    async def _verify(self, entry: CachedToken, secret: str, digest: bytes) -> bool:
        record = entry.record
        if await self._hasher.verify(record.secret_hash, secret):
            entry.memo_current = digest
            return True
        if record.previous_secret_hash is not None and self._in_grace(entry):
            if await self._hasher.verify(record.previous_secret_hash, secret):
                entry.memo_previous = digest
                return self._in_grace(entry)
        return False

    @staticmethod
    def _in_grace(entry: CachedToken) -> bool:
        return entry.previous_secret_until is not None and time.time() < entry.previous_secret_until
