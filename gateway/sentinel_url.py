"""A Redis Sentinel URL: which sentinels to ask, for which service's primary, with what credentials.

`redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`. redis-py documents no URL for
Sentinel, and a plain `urlsplit` cannot read a list of hosts, so the form is the one Celery, Spring and many
operators already write. The credentials are the Redis servers' (the primary and its replicas); the sentinels
are asked without any. Parsing needs no Redis client, so the settings can check the URL at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

from gateway.multi_host_url import credentials_and_hosts, host_ports

SENTINEL_SCHEME = "redis+sentinel"


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_sentinel_url(text: str) -> SentinelUrl:
    """Raises ValueError naming what is wrong. The message quotes nothing from the URL: a password with an
    unescaped `/` or `@` would land in the hosts or the path."""
    scheme, separator, rest = text.partition("://")
    if scheme.lower() != SENTINEL_SCHEME or not separator:
        raise ValueError(f"must start with {SENTINEL_SCHEME}://")
    if "?" in rest or "#" in rest:
        raise ValueError("must not have a query or a fragment")
    netloc, _, path = rest.partition("/")
    username, password, hosts = credentials_and_hosts(netloc)
    sentinels = host_ports(hosts, 26379, "sentinels")
    service, _, db_text = path.strip("/").partition("/")
    if not service:
        raise ValueError("must name the service after the hosts: redis+sentinel://HOST:PORT/SERVICE")
    if db_text and not (db_text.isascii() and db_text.isdigit()):
        raise ValueError("has a database number that is not a number (a password's / must be written %2F)")
    return SentinelUrl(sentinels, unquote(service), int(db_text or 0), username, password)
