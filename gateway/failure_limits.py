"""Limits on wrong secrets, the one input that makes the gateway spend real CPU (argon2).

Only attempts that would need argon2 are ever limited: a secret already known good (memo) is accepted first,
and a secret already known wrong is refused without argon2. Sources that keep failing, per client address
(an IPv6 /64 counts as one address) and per token id, get 429 with Retry-After for the rest of the window.
"""

from __future__ import annotations

import functools
import math
import time
from collections import OrderedDict

import netaddr

from gateway.client_ip import ClientAddress
from gateway.problems import GatewayError


def source_key(address: ClientAddress | None) -> str:
    """`192.0.2.1` for an IPv4 address, `2001:db8::/64` for any IPv6 address in that /64."""
    if address is None:
        return "unknown"
    if address.version == 6:
        return _ipv6_network_key(address.value >> 64)
    return address.text


@functools.lru_cache(maxsize=4096)
def _ipv6_network_key(network: int) -> str:
    return f"{netaddr.IPAddress(network << 64, 6)}/64"


class _Windows:
    """Failure counts in fixed windows, bounded in size (oldest dropped first)."""

    def __init__(self, limit: int, window: float, max_keys: int) -> None:
        self.limit = limit
        self._window = window
        self._max_keys = max_keys
        self._counts: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def retry_after(self, key: str, now: float) -> float | None:
        entry = self._counts.get(key)
        if entry is None:
            return None
        started, count = entry
        if now - started >= self._window:
            del self._counts[key]
            return None
        return started + self._window - now if count >= self.limit else None

    def add(self, key: str, now: float) -> None:
        started, count = self._counts.get(key, (now, 0))
        if now - started >= self._window:
            started, count = now, 0
        self._counts[key] = (started, count + 1)
        self._counts.move_to_end(key)
        while len(self._counts) > self._max_keys:
            self._counts.popitem(last=False)


class FailureLimits:
    def __init__(
        self,
        *,
        per_source: int = 20,
        per_token: int = 100,
        window: float = 60.0,
        remembered_failures: int = 100_000,
    ) -> None:
        self._sources = _Windows(per_source, window, 100_000)
        self._tokens = _Windows(per_token, window, 100_000)
        self._failed: OrderedDict[bytes, tuple[str, str | None]] = OrderedDict()
        self._remembered = remembered_failures
        self.throttled = 0

    def check(self, source: str, token_id: str) -> None:
        """Raise 429 when this source or this token has failed too often in the current window."""
        now = time.monotonic()
        waits = [wait for wait in (self._sources.retry_after(source, now), self._tokens.retry_after(token_id, now)) if wait]
        if waits:
            self.throttled += 1
            seconds = max(1, math.ceil(max(waits)))
            raise GatewayError(
                429,
                "too_many_failures",
                f"Too many wrong secrets from this address or for this token; retry in {seconds} s.",
                headers={"Retry-After": str(seconds)},
            )

    def known_wrong(self, digest: bytes, hashes: tuple[str, str | None]) -> bool:
        """True if this exact secret already failed against these very hashes."""
        return self._failed.get(digest) == hashes

    def record_failure(self, source: str, token_id: str, digest: bytes, hashes: tuple[str, str | None]) -> None:
        now = time.monotonic()
        self._sources.add(source, now)
        self._tokens.add(token_id, now)
        self._failed[digest] = hashes
        self._failed.move_to_end(digest)
        while len(self._failed) > self._remembered:
            self._failed.popitem(last=False)
