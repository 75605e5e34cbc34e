"""Last-used time and address, recorded in memory on the hot path and written to the store in batches."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Protocol

from gateway.background import raise_if_cancelling
from gateway.client_ip import ClientAddress
from gateway.store.base import TokenStore

log = logging.getLogger(__name__)


class UsageSink(Protocol):
    async def record_usage(self, usage: Mapping[str, tuple[datetime, str]]) -> None: ...


class UsageRecorder:
    """Writes to the store in one process, or merges into Redis when several proxies share it."""

    def __init__(self, sink: UsageSink, *, interval: float = 5.0) -> None:
        self._store = sink
        self._interval = interval
        self._pending: dict[str, tuple[float, ClientAddress | None]] = {}
        self.flushes = 0

    def record(self, token_id: str, client_ip: ClientAddress | None) -> None:
        self._pending[token_id] = (time.time(), client_ip)

    async def flush(self) -> None:
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
        except Exception:
            log.warning("could not write last-used times for %d token(s); will retry", len(batch), exc_info=True)
            for token_id, value in batch.items():
                self._pending.setdefault(token_id, value)

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

    def __init__(self, source: RedisUsageSource, store: TokenStore, *, interval: float = 5.0) -> None:
        self._source = source
        self._store = store
        self._interval = interval

    async def drain(self) -> int:
        usage = await self._source.take()
        if usage:
            await self._store.record_usage(usage)
        return len(usage)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.drain()
            except Exception:
                raise_if_cancelling()
                log.warning("could not move usage from Redis to the store; will retry", exc_info=True)

