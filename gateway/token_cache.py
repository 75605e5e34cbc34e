"""Tokens held in memory by each proxy process, in front of the store.

An entry carries what the hot path needs, precompiled: the token's ranges, its access level, its expiry as a
float, and the memo digests of secrets already verified with argon2. Entries are filled on first use (one store
read per token id, however many requests wait for it) and replaced write-through when the admin API commits a
change, so a change holds on the very next request. An unknown id is remembered for `negative_ttl` seconds, so
a flood of random ids costs the store one read per id, not one per request.

With several processes (Redis), changes arrive as invalidations; `ttl` then bounds how long an entry is
trusted if an invalidation is lost. A refreshed entry keeps its memo digests while the hashes are unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gateway.access_levels import AccessLevel
from gateway.ranges import AllowedRanges, compile_ranges
from gateway.tokens import TokenRecord, TokenStatus


class TokenSource(Protocol):
    """Where entries are filled from: the store itself, or Redis in front of it."""

    async def get_token(self, token_id: str) -> TokenRecord | None: ...


@dataclass(slots=True, eq=False)
class CachedToken:
    record: TokenRecord
    ip_ranges: AllowedRanges | None
    access_level: AccessLevel | None  # None when the level was removed from the config: every request is 403
    enabled: bool
    expires_at: float | None
    previous_secret_until: float | None
    loaded_at: float = 0.0  # monotonic; an entry older than the cache's ttl is refreshed before use
    memo_current: bytes | None = None
    memo_previous: bytes | None = None
    memo_revoked: tuple[bytes, ...] = ()  # digests of secrets this token had and no longer accepts
    rechecked_at: float = -math.inf  # monotonic; when a failed secret last made the store of record be read
    verifications: dict[bytes, asyncio.Future[bool]] = field(default_factory=dict)


def _secrets_of(record: TokenRecord) -> tuple[str, str | None, object]:
    return record.secret_hash, record.previous_secret_hash, record.previous_secret_expires_at


def _timestamp(record_time: object) -> float | None:
    return None if record_time is None else record_time.timestamp()  # type: ignore[attr-defined]


class TokenCache:
    def __init__(
        self,
        store: TokenSource,
        access_levels: Mapping[str, AccessLevel],
        *,
        max_entries: int = 100_000,
        negative_ttl: float = 5.0,
        ttl: float | None = None,
        origin: TokenSource | None = None,
        recheck_interval: float = 1.0,
    ) -> None:
        self._store = store
        self._origin = origin or store
        self._recheck_interval = recheck_interval
        self._rechecks: dict[str, asyncio.Task[TokenRecord | None]] = {}
        self._ttl = ttl
        self._levels = access_levels
        self._max_entries = max_entries
        self._negative_ttl = negative_ttl
        # A CachedToken, or the monotonic time until which the id is known not to exist.
        self._entries: OrderedDict[str, CachedToken | float] = OrderedDict()
        self._loads: dict[str, asyncio.Task[TokenRecord | None]] = {}
        # For metrics: lookups answered from memory (a fresh entry, or an id known not to exist), lookups
        # that waited for the source, and what the source answered when it is the store itself.
        # Called with a token id after its entry changed or was dropped (None: every entry), so what holds a
        # decision beyond one request (an open WebSocket tunnel, tunnel.py) can judge it again.
        self.listeners: list[Callable[[str | None], None]] = []
        self.hits = 0
        self.misses = 0
        self.source_found = 0
        self.source_missing = 0

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, token_id: str) -> CachedToken | None:
        entry = self._entries.get(token_id)
        return entry if isinstance(entry, CachedToken) else None

    def get_fresh(self, token_id: str) -> CachedToken | None:
        """The entry if it is cached and fresh: what `get` would answer without waiting for anything."""
        entry = self._entries.get(token_id)
        if type(entry) is CachedToken and (self._ttl is None or time.monotonic() - entry.loaded_at < self._ttl):
            self._entries.move_to_end(token_id)
            self.hits += 1
            return entry
        return None

    async def get(self, token_id: str) -> CachedToken | None:
        waited = False
        while True:
            entry = self._entries.get(token_id)
            if type(entry) is CachedToken and (self._ttl is None or time.monotonic() - entry.loaded_at < self._ttl):
                self._entries.move_to_end(token_id)
                if not waited:
                    self.hits += 1
                return entry
            if entry is not None:
                if type(entry) is CachedToken:
                    pass  # stale: refresh it below, keeping it meanwhile so its memo can be carried over
                elif entry > time.monotonic():  # type: ignore[operator]
                    if not waited:
                        self.hits += 1
                    return None
                else:
                    del self._entries[token_id]
            if not waited:
                waited = True
                self.misses += 1
            load = self._loads.get(token_id)
            if load is None:
                load = asyncio.ensure_future(self._store.get_token(token_id))
                self._loads[token_id] = load
                load.add_done_callback(functools.partial(self._settle, token_id))
            record = await asyncio.shield(load)  # a failed read raises here, for every waiter
            # Settle here too (it is idempotent): a waiter may resume before the done-callback has run, and
            # a done load awaited again never yields, so looping on it would spin the event loop.
            self._settle(token_id, load)
            if self._is_fresh(token_id):
                continue  # settled, or overtaken by a newer write-through: the loop reads the entry
            if record is None:
                return None
            # Overtaken by a delete while in flight, and nothing cached: read again rather than trust it.

    async def recheck(self, entry: CachedToken) -> CachedToken | None:
        """After a secret failed against `entry`: the token as the store of record has it now, if its secrets
        differ from `entry`'s (it is cached from then on), else None.

        An entry can be stale when a change notification was lost (Redis down during a rotation), and a
        correct new secret must not be judged by it. The store is read at most once per token id per
        `recheck_interval` seconds, one read shared by every request that waits for it, so a flood of wrong
        secrets costs the store one read per token per interval and no argon2 work while the secrets agree.
        """
        token_id = entry.record.id
        read = self._rechecks.get(token_id)
        if read is None:
            now = time.monotonic()
            current = self.peek(token_id)
            checked = max(entry.rechecked_at, current.rechecked_at if current is not None else -math.inf)
            if now - checked < self._recheck_interval:
                return None
            entry.rechecked_at = now
            if current is not None:
                current.rechecked_at = now
            read = asyncio.ensure_future(self._origin.get_token(token_id))
            self._rechecks[token_id] = read
            read.add_done_callback(functools.partial(self._recheck_done, token_id))
        record = await asyncio.shield(read)  # a failed read raises here, for every waiter
        if record is None:
            self.forget(token_id)  # deleted in the store (ids are never reused)
            return None
        current = self.peek(token_id)
        if current is None or current.record.version < record.version:
            self.apply(record)
            current = self.peek(token_id)
        if current is None or _secrets_of(current.record) == _secrets_of(entry.record):
            return None
        return current

    def _recheck_done(self, token_id: str, read: asyncio.Task[TokenRecord | None]) -> None:
        if self._rechecks.get(token_id) is read:
            del self._rechecks[token_id]

    def _settle(self, token_id: str, load: asyncio.Task[TokenRecord | None]) -> None:
        if self._loads.get(token_id) is not load:
            return  # a change happened while this read was in flight: its result may be stale
        del self._loads[token_id]
        if load.cancelled() or load.exception() is not None:
            return
        record = load.result()
        if record is None:
            self.source_missing += 1
        else:
            self.source_found += 1
        current = self._entries.get(token_id)
        previous = current if isinstance(current, CachedToken) else None
        if record is None:
            self._entries.pop(token_id, None)
            if self._negative_ttl > 0:
                self._insert(token_id, time.monotonic() + self._negative_ttl)
        elif previous is not None and previous.record.version > record.version:
            previous.loaded_at = time.monotonic()  # we already know a newer version than the source told us
        else:
            self._insert(token_id, self._build(record, previous))

    def _is_fresh(self, token_id: str) -> bool:
        entry = self._entries.get(token_id)
        if type(entry) is CachedToken:
            return self._ttl is None or time.monotonic() - entry.loaded_at < self._ttl
        return entry is not None

    def apply(self, record: TokenRecord) -> None:
        """Write-through after the store committed a change: the next request sees `record`."""
        self._loads.pop(record.id, None)
        current = self._entries.get(record.id)
        previous = current if isinstance(current, CachedToken) else None
        if previous is not None and previous.record.version > record.version:
            return
        self._insert(record.id, self._build(record, previous))
        self._changed(record.id)

    def forget(self, token_id: str) -> None:
        """After a delete: drop the entry and any read in flight."""
        self._loads.pop(token_id, None)
        self._entries.pop(token_id, None)
        if self._negative_ttl > 0:
            self._insert(token_id, time.monotonic() + self._negative_ttl)
        self._changed(token_id)

    def invalidate(self, token_id: str) -> None:
        """Another process changed the token: refresh it before its next use (and drop a read in flight)."""
        self._loads.pop(token_id, None)
        entry = self._entries.get(token_id)
        if isinstance(entry, CachedToken):
            entry.loaded_at = -math.inf
        elif entry is not None:
            del self._entries[token_id]
        self._changed(token_id)

    def invalidate_all(self) -> None:
        """After lost invalidations: every entry is refreshed before its next use, memos kept where valid."""
        self._loads.clear()
        for token_id, entry in list(self._entries.items()):
            if isinstance(entry, CachedToken):
                entry.loaded_at = -math.inf
            else:
                del self._entries[token_id]
        self._changed(None)

    def _changed(self, token_id: str | None) -> None:
        for listener in self.listeners:
            listener(token_id)

    def clear(self) -> None:
        self._loads.clear()
        self._entries.clear()

    def _insert(self, token_id: str, entry: CachedToken | float) -> None:
        self._entries[token_id] = entry
        self._entries.move_to_end(token_id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def _build(self, record: TokenRecord, previous: CachedToken | None) -> CachedToken:
        entry = CachedToken(
            record=record,
            loaded_at=time.monotonic(),
            ip_ranges=compile_ranges(record.allowed_ip_ranges),
            access_level=self._levels.get(record.access_level),
            enabled=record.status is TokenStatus.ENABLED,
            expires_at=_timestamp(record.expires_at),
            previous_secret_until=_timestamp(record.previous_secret_expires_at),
        )
        if previous is not None:
            entry.rechecked_at = previous.rechecked_at
            # A memo proves knowledge of the secret behind a hash: it stays valid exactly as long as that hash.
            # A digest of a secret whose hash is gone is remembered as revoked: answered without argon2.
            old = previous.record
            revoked = list(previous.memo_revoked)
            if old.secret_hash == record.secret_hash:
                entry.memo_current = previous.memo_current
                if old.previous_secret_hash == record.previous_secret_hash:
                    entry.memo_previous = previous.memo_previous
                elif previous.memo_previous is not None:
                    revoked.append(previous.memo_previous)
            else:
                if record.previous_secret_hash == old.secret_hash:
                    entry.memo_previous = previous.memo_current
                elif previous.memo_current is not None:
                    revoked.append(previous.memo_current)
                if previous.memo_previous is not None:
                    revoked.append(previous.memo_previous)
            entry.memo_revoked = tuple(revoked[-4:])
        return entry
