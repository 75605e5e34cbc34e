"""The host lists and credentials that redis+sentinel:// and redis+cluster:// URLs share."""

from __future__ import annotations

import pytest

from gateway.cluster_url import parse_cluster_url
from gateway.sentinel_url import parse_sentinel_url


def test_each_scheme_fills_in_its_own_default_port_ipv6_included() -> None:
    cluster = parse_cluster_url("redis+cluster://:pw@[::1],[::1]:7001,redis-a")
    sentinel = parse_sentinel_url("redis+sentinel://app:p%40ss@[fd00::2],s2:26380/main")

    assert cluster.nodes == (("::1", 6379), ("::1", 7001), ("redis-a", 6379))
    assert (cluster.username, cluster.password) == (None, "pw")
    assert sentinel.sentinels == (("fd00::2", 26379), ("s2", 26380))
    assert (sentinel.username, sentinel.password) == ("app", "p@ss")


@pytest.mark.parametrize("hosts", ["a:0", "a:65536", "a:x", ":6379", "a,,b", "[::1]x"])
def test_a_bad_host_list_names_what_each_url_lists(hosts: str) -> None:
    with pytest.raises(ValueError, match="must list cluster nodes as HOST:PORT"):
        parse_cluster_url(f"redis+cluster://{hosts}")
    with pytest.raises(ValueError, match="must list sentinels as HOST:PORT"):
        parse_sentinel_url(f"redis+sentinel://{hosts}/main")
