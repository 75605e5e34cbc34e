"""Limits on wrong secrets, the one input that makes the gateway spend real CPU (argon2).

Only attempts that would need argon2 are ever limited: a secret already known good (memo) is accepted first,
and a secret already known wrong is refused without argon2. Sources that keep failing, per client address
(an IPv6 /64 counts as one address) and per token id, get 429 with Retry-After for the rest of the window.
A secret counts as wrong only once the store of record agrees with the cached entry that refused it
(authenticator.py), so a stale entry cannot make a correct secret count against its address.
The windows take a clock, so tests can move time instead of sleeping.
"""

from __future__ import annotations

import functools
import math
import time
from collections import OrderedDict
from collections.abc import Callable

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


Clock = Callable[[], float]


def too_many_failures(seconds: float, detail: str) -> GatewayError:
    """The 429 both planes answer, with the whole seconds left in the window as Retry-After (at least 1)."""
    wait = max(1, math.ceil(seconds))
    return GatewayError(429, "too_many_failures", f"{detail}; retry in {wait} s.", headers={"Retry-After": str(wait)})


class FailureWindows:
    """Failure counts per key in fixed windows (a window starts at a key's first failure), bounded in size:
    the key failed least recently is dropped first."""

    def __init__(self, limit: int, window: float, *, max_keys: int = 100_000, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._max_keys = max_keys
        self._clock = clock
        self._counts: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def retry_after(self, key: str) -> float | None:
        """Seconds until `key` may fail again, or None while it is under the limit."""
        entry = self._counts.get(key)
        if entry is None:
            return None
        started, count = entry
        now = self._clock()
        if now - started >= self.window:
            del self._counts[key]
            return None
        return started + self.window - now if count >= self.limit else None

    def add(self, key: str) -> None:
        now = self._clock()
        started, count = self._counts.get(key, (now, 0))
        if now - started >= self.window:
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
        clock: Clock = time.monotonic,
    ) -> None:
        self._sources = FailureWindows(per_source, window, clock=clock)
        self._tokens = FailureWindows(per_token, window, clock=clock)
        self._failed: OrderedDict[bytes, tuple[str, str | None]] = OrderedDict()
        self._remembered = remembered_failures

    def check(self, source: str, token_id: str) -> None:
        """Raise 429 when this source or this token has failed too often in the current window."""
        waits = [wait for wait in (self._sources.retry_after(source), self._tokens.retry_after(token_id)) if wait]
        if waits:
            raise too_many_failures(max(waits), "Too many wrong secrets from this address or for this token")

    def known_wrong(self, digest: bytes, hashes: tuple[str, str | None]) -> bool:
        """True if this exact secret already failed against these very hashes."""
        return self._failed.get(digest) == hashes

    def remember_wrong(self, digest: bytes, hashes: tuple[str, str | None]) -> None:
        """Remember that this secret failed against these hashes, without counting it (yet)."""
        self._failed[digest] = hashes
        self._failed.move_to_end(digest)
        while len(self._failed) > self._remembered:
            self._failed.popitem(last=False)

    def record_failure(self, source: str, token_id: str, digest: bytes, hashes: tuple[str, str | None]) -> None:
        self._sources.add(source)
        self._tokens.add(token_id)
        self._failed[digest] = hashes
        self._failed.move_to_end(digest)
        while len(self._failed) > self._remembered:
            self._failed.popitem(last=False)
