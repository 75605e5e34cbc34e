"""Allowed ranges: the bisect structure answers exactly what netaddr's IPSet answered before it."""

from __future__ import annotations

import ipaddress

import netaddr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.client_ip import ClientAddress, parse_address
from gateway.ranges import compile_ranges, normalize_range

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
mapped = ipv4.map(lambda address: ipaddress.IPv6Address(f"::ffff:{address}"))
# Ranges as an admin might type them: host bits set, IPv4-mapped, overlapping and adjacent ones in one list.
range_texts = st.one_of(
    st.tuples(ipv4, st.integers(0, 32)),
    st.tuples(ipv6, st.integers(0, 128)),
    st.tuples(mapped, st.integers(80, 128)),
).map(lambda network: f"{network[0]}/{network[1]}")


def _address(text: str) -> ClientAddress:
    address = parse_address(text)
    assert address is not None, text
    return address


def _spellings(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[str]:
    spelled = [str(address)]
    if isinstance(address, ipaddress.IPv4Address):
        spelled.append(f"::ffff:{address}")
    return spelled


def _near_edges(text: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The first and last address of a range and their outside neighbours: where an off-by-one would show."""
    network = ipaddress.ip_network(text, strict=False)
    top = 2**network.max_prefixlen - 1
    first, last = int(network.network_address), int(network.broadcast_address)
    values = {max(first - 1, 0), first, last, min(last + 1, top)}
    kind = ipaddress.IPv4Address if network.version == 4 else ipaddress.IPv6Address
    return [kind(value) for value in sorted(values)]


@PROPERTY
@given(st.lists(range_texts, min_size=1, max_size=8), st.lists(st.one_of(ipv4, ipv6, mapped), max_size=6))
def test_membership_equals_netaddr_ipset(
    texts: list[str], others: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> None:
    for ranges in (texts, [normalize_range(text) for text in texts]):  # as typed, and as stored
        compiled = compile_ranges(ranges)
        reference = netaddr.IPSet(netaddr.IPNetwork(text) for text in ranges)
        assert compiled is not None
        candidates = [*others, *(edge for text in ranges for edge in _near_edges(text))]
        for candidate in candidates:
            for spelling in _spellings(candidate):
                client = _address(spelling)
                expected = netaddr.IPAddress(client.value, client.version) in reference
                assert (client in compiled) == expected, (spelling, ranges, compiled)


def test_no_ranges_compile_to_none() -> None:
    assert compile_ranges([]) is None


@pytest.mark.parametrize(
    ("ranges", "inside", "outside"),
    [
        (["10.0.0.0/9", "10.128.0.0/9"], ["10.0.0.0", "10.127.255.255", "10.128.0.0", "10.255.255.255"],
         ["9.255.255.255", "11.0.0.0"]),
        (["10.0.0.0/8", "10.1.0.0/16"], ["10.1.2.3", "10.200.0.1"], ["11.0.0.0"]),
        (["0.0.0.0/0"], ["0.0.0.0", "255.255.255.255", "::ffff:1.2.3.4"], ["::1", "::ffff:0:1.2.3.4"]),
        (["::/0"], ["::", "2001:db8::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"], ["1.2.3.4"]),
        (["2001:db8::/32", "192.0.2.7/32"], ["2001:db8:ffff::1", "192.0.2.7", "::ffff:192.0.2.7"],
         ["192.0.2.8", "2001:db9::", "::c000:207"]),
    ],
)
def test_merged_adjacent_and_nested_ranges_keep_their_edges(
    ranges: list[str], inside: list[str], outside: list[str]
) -> None:
    compiled = compile_ranges(ranges)
    assert compiled is not None

    for text in inside:
        assert _address(text) in compiled, text
    for text in outside:
        assert _address(text) not in compiled, text
