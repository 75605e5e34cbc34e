"""What the Redis URLs that name several servers share (redis+sentinel://, redis+cluster://): the credentials
before the `@` and the comma-separated HOST[:PORT] list after it.

Messages quote nothing from the URL: a password with an unescaped `/` or `@` would land in the hosts.
"""

from __future__ import annotations

from urllib.parse import unquote


def credentials_and_hosts(netloc: str) -> tuple[str | None, str | None, str]:
    """`[[USER]:PASSWORD@]HOSTS`: (the user, the password, the hosts), each unquoted; None when absent."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, hosts
    user_text, colon, password_text = userinfo.partition(":")
    return unquote(user_text) or None, unquote(password_text) if colon else None, hosts


def host_ports(hosts: str, default_port: int, what: str) -> tuple[tuple[str, int], ...]:
    """`HOST[:PORT][,HOST[:PORT]...]` as (host, port) pairs; an IPv6 address in brackets (`[::1]:6379`,
    `[::1]`). `what` names the items in the ValueError ("sentinels", "cluster nodes")."""
    return tuple(_host_port(item.strip(), default_port, what) for item in hosts.split(","))


def _host_port(item: str, default_port: int, what: str) -> tuple[str, int]:
    host, colon, port_text = item.rpartition(":")
    if not colon or item.endswith("]"):  # no port, or a bracketed IPv6 address without one
        host, port_text = item, str(default_port)
    host = host.removeprefix("[").removesuffix("]")
    if not host or not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(
            f"must list {what} as HOST:PORT, separated by commas (a password's / must be written %2F)"
        )
    return host, int(port_text)
