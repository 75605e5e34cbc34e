"""A Redis Cluster URL: which nodes to ask for the cluster's layout first, with what credentials, over TLS or not.

`redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...][/]`, or `rediss+cluster://` for TLS, with the TLS
options redis-py takes as a query (`?ssl_ca_certs=/etc/redis/ca.pem`). The hosts are only the first ones asked:
the client learns every node from `CLUSTER SLOTS` and follows the layout as it changes, so a few suffice. A
cluster has one database (0), so there is no database number. Parsing needs no Redis client, so the settings
can check the URL at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from gateway.multi_host_url import credentials_and_hosts, host_ports

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# The TLS options a query may set, as redis-py's connections take them.
TLS_OPTIONS = frozenset({"ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"})


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    nodes: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_options: tuple[tuple[str, str], ...] = ()


def is_cluster_url(text: str) -> bool:
    return text.partition("://")[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(text: str) -> ClusterUrl:
    """Raises ValueError naming what is wrong. The message quotes nothing from the URL: a password with an
    unescaped `/` or `@` would land in the hosts or the path."""
    scheme, separator, rest = text.partition("://")
    if scheme.lower() not in CLUSTER_SCHEMES or not separator:
        raise ValueError("must start with redis+cluster:// or rediss+cluster://")
    if "#" in rest:
        raise ValueError("must not have a fragment")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if path.strip("/"):
        raise ValueError(
            "must not name a database or path after the hosts: a cluster has only database 0"
            " (a password's / must be written %2F)"
        )
    username, password, hosts = credentials_and_hosts(netloc)
    nodes = host_ports(hosts, 6379, "cluster nodes")
    tls = scheme.lower() == "rediss+cluster"
    options = tuple(parse_qsl(query, keep_blank_values=True))
    unknown = sorted({name for name, _ in options} - TLS_OPTIONS)
    if unknown:
        raise ValueError(f"takes only the TLS options {', '.join(sorted(TLS_OPTIONS))} as a query")
    if options and not tls:
        raise ValueError("has TLS options but is not rediss+cluster://")
    return ClusterUrl(nodes, tls, username, password, options)
