"""The core both planes share in one process: settings, store, hasher, token cache and usage recorder.

Only the composition root (the command line, or a test) opens it; the proxy and the admin API receive it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from gateway.client_ip import ClientIpResolver
from gateway.secrets import SecretHasher
from gateway.settings import Settings
from gateway.store import SQLiteStore, TokenStore
from gateway.token_cache import TokenCache
from gateway.usage import UsageRecorder


@dataclass(frozen=True, slots=True)
class Core:
    settings: Settings
    store: TokenStore
    hasher: SecretHasher
    tokens: TokenCache
    usage: UsageRecorder
    client_ips: ClientIpResolver


core_key = web.AppKey("core", Core)


@asynccontextmanager
async def open_core(settings: Settings) -> AsyncIterator[Core]:
    store = SQLiteStore(settings.database_path)
    await store.open()
    hasher = SecretHasher(settings.argon2)
    try:
        yield Core(
            settings=settings,
            store=store,
            hasher=hasher,
            tokens=TokenCache(
                store,
                settings.access_levels,
                max_entries=settings.cache_max_entries,
                negative_ttl=settings.negative_cache_ttl,
            ),
            usage=UsageRecorder(store, interval=settings.usage_flush_interval),
            client_ips=ClientIpResolver(settings.trusted_proxies),
        )
    finally:
        hasher.close()
        await store.close()
