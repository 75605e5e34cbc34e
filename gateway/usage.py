"""Last-used time and address, and requests counted by outcome (request_counts.py), recorded in memory on the
hot path and written in batches: no store or Redis round trip per request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Protocol

from gateway.background import raise_if_cancelling
from gateway.client_ip import ClientAddress
from gateway.outage import OutageLog
from gateway.request_counts import HOUR, OUTCOME_OF_CODE, AddressUses, Counts, Outcome, PreviousUses, roll_up
from gateway.store.base import TokenStore
from gateway.tokens import TokenRecord, utc_now

log = logging.getLogger(__name__)

# (token, address) pairs held between two flushes: a flood from many addresses cannot grow memory past this.
MAX_PENDING_ADDRESSES = 10_000


class UsageSink(Protocol):
    async def record_usage(self, usage: Mapping[str, tuple[datetime, str]]) -> None: ...

    async def record_counts(self, counts: Counts, *, now: float) -> None:
        """Add these counts; forget buckets older than they are kept (`now` by the recorder's clock)."""
        ...

    async def record_previous_uses(self, uses: PreviousUses) -> None:
        """Add uses of a previous secret, by (token id, rotation time): (count, last use, its address)."""
        ...

    async def record_addresses(self, uses: AddressUses) -> None:
        """Add requests by (token id, address); keep each token's RECENT_ADDRESSES most recent addresses."""
        ...


class UsageRecorder:
    """Writes to the store in one process, or merges into Redis when several proxies share it.

    `clock` places requests in their hour (a test moves it across a boundary); by default the system time."""

    def __init__(
        self,
        sink: UsageSink,
        *,
        interval: float = 5.0,
        outage: OutageLog | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._store = sink
        self._interval = interval
        self._outage = outage or OutageLog(log, "the store")
        self._pending: dict[str, tuple[float, ClientAddress | None]] = {}
        self._counts: dict[tuple[int, str, Outcome], int] = {}
        # `allowed` requests of the hour [_hour, _hour_end) by token, folded into _counts when the hour ends
        # and before a flush: no (hour, token, outcome) key to build and hash per request.
        self._allowed: dict[str, int] = {}
        self._hour = 0
        self._hour_end = 0
        self._previous: dict[tuple[str, datetime], tuple[int, float, ClientAddress | None]] = {}
        self._addresses: dict[tuple[str, ClientAddress], tuple[int, float]] = {}
        self._now: Callable[[], float] = time.time if clock is utc_now else lambda: clock().timestamp()
        self._flushing = asyncio.Lock()
        self.flushes = 0

    def record(self, token_id: str, client_ip: ClientAddress | None) -> None:
        """A request allowed: the token's last use, and one more `allowed` in this hour."""
        now = self._now()
        if not self._hour <= now < self._hour_end:
            self._new_hour(now)
        self._pending[token_id] = (now, client_ip)
        allowed = self._allowed
        allowed[token_id] = allowed.get(token_id, 0) + 1
        if client_ip is not None:
            addresses = self._addresses
            seen = addresses.get((token_id, client_ip))
            if seen is not None:
                addresses[token_id, client_ip] = (seen[0] + 1, now)
            elif len(addresses) < MAX_PENDING_ADDRESSES:
                addresses[token_id, client_ip] = (1, now)

    def _new_hour(self, now: float) -> None:
        self._fold_allowed()
        self._hour = int(now // HOUR) * HOUR
        self._hour_end = self._hour + HOUR

    def _fold_allowed(self) -> None:
        if not self._allowed:
            return
        counts, hour, allowed = self._counts, self._hour, Outcome.ALLOWED
        for token_id, count in self._allowed.items():
            key = (hour, token_id, allowed)
            counts[key] = counts.get(key, 0) + count
        self._allowed = {}

    def count(self, token_id: str, outcome: Outcome) -> None:
        """One request of this token with this outcome, in the current hour (rate limits call this for
        `rate_limited` and `quota_exceeded`; `record` counts `allowed`)."""
        key = (int(self._now() // HOUR) * HOUR, token_id, outcome)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1

    def previous_secret_used(self, record: TokenRecord, client_ip: ClientAddress | None) -> None:
        """A request allowed with the previous secret, during the grace of the rotation at `rotated_at`."""
        if record.rotated_at is None:
            return
        key = (record.id, record.rotated_at)
        known = self._previous.get(key)
        self._previous[key] = (1 if known is None else known[0] + 1, self._now(), client_ip)

    def refused(self, token_id: str, code: str) -> None:
        """A request of a known token refused with this problem code: counted if it is an outcome."""
        outcome = OUTCOME_OF_CODE.get(code)
        if outcome is not None:
            self.count(token_id, outcome)

    async def flush(self) -> None:
        """Write what was recorded so far. One flush at a time: a flush called while the timer's runs returns
        once that one has written too."""
        async with self._flushing:
            await self._flush_counts()
            await self._flush_previous()
            await self._flush_addresses()
            await self._flush_last_used()

    async def _flush_last_used(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        usage = {
            token_id: (datetime.fromtimestamp(at, UTC), "" if ip is None else str(ip))
            for token_id, (at, ip) in batch.items()
        }
        try:
            await self._store.record_usage(usage)
            self.flushes += 1
            if self._outage.down:
                self._outage.recovered()
        except Exception as error:
            self._outage.failed(error, f"last-used times wait in memory, written again every {self._interval:g}s")
            for token_id, value in batch.items():
                self._pending.setdefault(token_id, value)

    async def _flush_counts(self) -> None:
        self._fold_allowed()
        if not self._counts:
            return
        batch, self._counts = self._counts, {}
        try:
            await self._store.record_counts(roll_up(batch), now=self._now())
            if self._outage.down:
                self._outage.recovered()
        except Exception as error:
            self._outage.failed(error, f"request counts wait in memory, written again every {self._interval:g}s")
            counts = self._counts
            for key, count in batch.items():
                counts[key] = counts.get(key, 0) + count

    async def _flush_previous(self) -> None:
        if not self._previous:
            return
        batch, self._previous = self._previous, {}
        uses: PreviousUses = {
            key: (count, datetime.fromtimestamp(at, UTC), "" if ip is None else str(ip))
            for key, (count, at, ip) in batch.items()
        }
        try:
            await self._store.record_previous_uses(uses)
        except Exception as error:
            self._outage.failed(error, f"previous-secret uses wait in memory, written again every {self._interval:g}s")
            for key, (count, at, ip) in batch.items():
                known = self._previous.get(key)
                self._previous[key] = (count, at, ip) if known is None else (known[0] + count, known[1], known[2])

    async def _flush_addresses(self) -> None:
        if not self._addresses:
            return
        batch, self._addresses = self._addresses, {}
        uses: AddressUses = {
            (token_id, address.text): (count, datetime.fromtimestamp(at, UTC))
            for (token_id, address), (count, at) in batch.items()
        }
        try:
            await self._store.record_addresses(uses)
        except Exception as error:
            self._outage.failed(error, f"client addresses wait in memory, written again every {self._interval:g}s")
            for key, (count, at) in batch.items():
                known = self._addresses.get(key)
                self._addresses[key] = (count, at) if known is None else (known[0] + count, known[1])

    async def run(self) -> None:
        """Flush every `interval` seconds until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(self._interval)
                await self.flush()
        finally:
            await asyncio.shield(self.flush())


class RedisUsageSource(Protocol):
    async def take(self) -> dict[str, tuple[datetime, str]]: ...


class UsageDrainer:
    """In the admin process: moves the usage that proxies merged into Redis into the store, in batches."""

    def __init__(
        self,
        source: RedisUsageSource,
        store: TokenStore,
        *,
        interval: float = 5.0,
        source_outage: OutageLog | None = None,
    ) -> None:
        self._source = source
        self._store = store
        self._interval = interval
        self._source_outage = source_outage or OutageLog(log, "redis")
        self._store_outage = OutageLog(log, "the store")

    async def drain(self) -> int:
        try:
            usage = await self._source.take()
        except Exception as error:
            raise_if_cancelling()
            self._source_outage.failed(error, "last-used times wait there until it answers")
            return 0
        if self._source_outage.down:
            self._source_outage.recovered()
        if usage:
            try:
                await self._store.record_usage(usage)
            except Exception as error:
                raise_if_cancelling()
                # Taken from Redis already: these last-used times are lost (the next use records them again).
                self._store_outage.failed(error, f"{len(usage)} last-used time(s) were not written")
                return 0
            if self._store_outage.down:
                self._store_outage.recovered()
        return len(usage)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.drain()

