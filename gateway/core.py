"""The core both planes share in one process: settings, store, hasher, token cache, usage and change delivery.

Only the composition root (the command line, or a test) opens it; the proxy and the admin API receive it.
Without Redis the token cache lives in this process (on PostgreSQL, other processes' changes arrive by the
store's NOTIFY); with Redis it is layered (process -> Redis -> store) and changes also travel through Redis.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web

from gateway.client_ip import ClientIpResolver
from gateway.invalidation import InvalidationListener
from gateway.metrics import Metrics
from gateway.ratelimits.gcra import LocalLimiter
from gateway.ratelimits.limiter import TokenLimiter
from gateway.ratelimits.shared import RedisLimiter
from gateway.redis_cluster import RedisClient
from gateway.redis_tokens import RedisTokens, RedisUsage, connect, disconnect
from gateway.request_counts import CountReader
from gateway.secrets import SecretHasher
from gateway.settings import Settings
from gateway.store import SQLiteStore, TokenStore
from gateway.store.postgres import PostgresStore
from gateway.store_notifications import StoreNotificationListener
from gateway.token_cache import TokenCache
from gateway.token_changes import LocalTokenChanges, RedisTokenChanges, TokenChanges
from gateway.tokens import utc_now
from gateway.usage import UsageDrainer, UsageRecorder


@dataclass(frozen=True, slots=True)
class SharedCache:
    """The Redis side of the core; its background tasks are run by the plane that needs them."""

    client: RedisClient
    tokens: RedisTokens
    listener: InvalidationListener  # proxy plane
    changes: RedisTokenChanges  # admin plane: outbox delivery
    usage_drainer: UsageDrainer  # admin plane


@dataclass(frozen=True, slots=True)
class Core:
    settings: Settings
    store: TokenStore
    hasher: SecretHasher
    tokens: TokenCache
    usage: UsageRecorder
    client_ips: ClientIpResolver
    changes: TokenChanges
    metrics: Metrics
    counts: CountReader  # where the admin reads request counts: Redis if proxies share one, else the store
    limiter: TokenLimiter
    shared: SharedCache | None = None
    # With PostgreSQL: the store's own change notifications, heard by the proxy plane beside Redis.
    store_listener: StoreNotificationListener | None = None
    # The wall clock the admin API stamps changes with (creation, rotation grace, expiry checks) and the
    # limiter counts quota periods by; a test sets it to another moment to see grace and expiry end, or a UTC
    # day begin, without waiting.
    clock: Callable[[], datetime] = utc_now


core_key = web.AppKey("core", Core)


def create_store(settings: Settings, *, migrate: bool | None = None) -> TokenStore:
    """The configured backend, not yet open. By default (None) SQLite upgrades its own file on open, and
    PostgreSQL, which many processes on many hosts share, only when asked (`gateway migrate`, `--migrate`)."""
    record_changes = settings.redis_url is not None
    if settings.postgres_url is not None:
        return PostgresStore(
            settings.postgres_url,
            password=settings.database_password,
            record_changes=record_changes,
            migrate=bool(migrate),
            pool_size=settings.database_pool_size,
            statement_timeout=settings.database_statement_timeout,
            connect_timeout=settings.database_connect_timeout,
        )
    assert settings.database_path is not None
    return SQLiteStore(settings.database_path, record_changes=record_changes, migrate=migrate is not False)


@asynccontextmanager
async def open_core(
    settings: Settings, *, clock: Callable[[], datetime] = utc_now, migrate: bool | None = None
) -> AsyncIterator[Core]:
    store = create_store(settings, migrate=migrate)
    await store.open()
    hasher = SecretHasher(settings.argon2)
    client = connect(settings.redis_url.reveal()) if settings.redis_url is not None else None
    core: Core | None = None
    try:
        core = _assemble(settings, store, hasher, client, clock)
        if isinstance(store, PostgresStore):
            core = dataclasses.replace(core, store_listener=StoreNotificationListener(store, store, core.tokens))
        yield core
    finally:
        if client is not None:
            if core is not None:
                await core.limiter.close()
            await disconnect(client)
        hasher.close()
        await store.close()


def _assemble(
    settings: Settings,
    store: TokenStore,
    hasher: SecretHasher,
    client: RedisClient | None,
    clock: Callable[[], datetime],
) -> Core:
    cache_options = {
        "max_entries": settings.cache_max_entries,
        "negative_ttl": settings.negative_cache_ttl,
        "recheck_interval": settings.token_recheck_interval,
    }
    client_ips = ClientIpResolver(settings.trusted_proxies)
    metrics = Metrics(token_labels=settings.metrics_token_labels)
    seconds: Callable[[], float] = time.time if clock is utc_now else lambda: clock().timestamp()
    local_limits = LocalLimiter(max_entries=settings.cache_max_entries)
    if client is None:
        # Entries are trusted until a change says otherwise: alone on SQLite every change is written through
        # here; on PostgreSQL other processes' changes come by NOTIFY, on a connection checked every second
        # and followed by a full refresh when it returns. With the store down, no token can change, so known
        # tokens keep working from here.
        tokens = TokenCache(store, settings.access_levels, **cache_options)  # type: ignore[arg-type]
        return Core(
            settings=settings,
            store=store,
            hasher=hasher,
            tokens=tokens,
            usage=UsageRecorder(store, interval=settings.usage_flush_interval, clock=clock),
            client_ips=client_ips,
            changes=LocalTokenChanges(tokens),
            metrics=metrics,
            counts=store,
            limiter=TokenLimiter(local=local_limits, clock=seconds),
            clock=clock,
        )
    shared_tokens = RedisTokens(
        client, store, key_prefix=settings.redis_key_prefix, entry_ttl=settings.redis_entry_ttl
    )
    tokens = TokenCache(
        shared_tokens, settings.access_levels, ttl=settings.cache_ttl, origin=store, **cache_options  # type: ignore[arg-type]
    )
    usage = RedisUsage(client, key_prefix=settings.redis_key_prefix)
    turn = store.delivery_turn if isinstance(store, PostgresStore) else None
    changes = RedisTokenChanges(store, shared_tokens, local_cache=tokens, turn=turn)
    return Core(
        settings=settings,
        store=store,
        hasher=hasher,
        tokens=tokens,
        usage=UsageRecorder(usage, interval=settings.usage_flush_interval, outage=shared_tokens.outage, clock=clock),
        client_ips=client_ips,
        changes=changes,
        metrics=metrics,
        counts=usage,
        limiter=TokenLimiter(
            local=local_limits,
            shared=RedisLimiter(
                client,
                local_limits,
                key_prefix=settings.redis_key_prefix,
                outage=shared_tokens.outage,
                leases=settings.limit_leases,
            ),
            clock=seconds,
        ),
        shared=SharedCache(
            client=client,
            tokens=shared_tokens,
            listener=InvalidationListener(client, shared_tokens, tokens, metrics=metrics),
            changes=changes,
            usage_drainer=UsageDrainer(
                usage, store, interval=settings.usage_flush_interval, source_outage=shared_tokens.outage
            ),
        ),
        clock=clock,
    )
