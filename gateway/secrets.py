"""Secret hashing: argon2id for what is stored, a keyed fast hash for what was already verified.

argon2 is deliberately slow (tens of milliseconds of CPU), so it runs in a bounded thread pool, never on the
event loop, and only the first time a secret is seen: the memo digest (BLAKE2b keyed with a per-process random
key) lets the hot path recognise a secret it has verified before in about a microsecond.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets as random_source
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


@dataclass(frozen=True, slots=True)
class Argon2Parameters:
    time_cost: int = 2
    memory_cost_kib: int = 19 * 1024
    parallelism: int = 1


class SecretHasher:
    """Hashes and verifies secrets with argon2id off the event loop, and counts its work."""

    def __init__(self, parameters: Argon2Parameters = Argon2Parameters(), *, max_concurrency: int | None = None):
        self._hasher = PasswordHasher(
            time_cost=parameters.time_cost,
            memory_cost=parameters.memory_cost_kib,
            parallelism=parameters.parallelism,
        )
        workers = max_concurrency or os.cpu_count() or 1
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon2")
        self._memo_key = random_source.token_bytes(32)
        self.hash_calls = 0
        self.verify_calls = 0

    async def hash(self, secret: str) -> str:
        self.hash_calls += 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._hasher.hash, secret)

    async def verify(self, secret_hash: str, secret: str) -> bool:
        """True when `secret` matches `secret_hash`. A malformed hash is a mismatch, never an exception."""
        self.verify_calls += 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._verify_blocking, secret_hash, secret)

    def _verify_blocking(self, secret_hash: str, secret: str) -> bool:
        try:
            return self._hasher.verify(secret_hash, secret)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, secret_hash: str) -> bool:
        return self._hasher.check_needs_rehash(secret_hash)

    def memo_digest(self, subject: str, secret: str) -> bytes:
        """A keyed digest of `secret` for `subject` (a token or admin key id), safe to keep in memory."""
        return hashlib.blake2b(
            secret.encode(), key=self._memo_key, person=b"gw-memo", salt=subject.encode()[:16], digest_size=32
        ).digest()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def digests_equal(known_digest: bytes | None, presented_digest: bytes) -> bool:
    return known_digest is not None and hmac.compare_digest(known_digest, presented_digest)
