"""The client-address resolver on its own: right-to-left walking, trust, and odd spellings."""

from __future__ import annotations

from collections.abc import Iterable

import netaddr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.client_ip import ClientIpResolver, parse_address, parse_forwarded_hop

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)
TRUSTED_PROXIES = ["10.0.0.0/8", "fd00::/8", "192.0.2.0/24"]

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
address_spellings = st.one_of(
    ipv4,
    ipv6,
    st.sampled_from(
        ["0.0.0.0", "::", "::1", "::ffff:0.0.0.0", "::1.2.3.4", "::ffff:0:1.2.3.4", "64:ff9b::1.2.3.4"]
    ),
    st.sampled_from(["10.0.0.1", "10.255.255.255", "fd00::1", "192.0.2.1", "::ffff:10.1.2.3"]),  # trusted
    ipv4.map(lambda address: f"::ffff:{address}"),
    ipv4.map(lambda address: f"::FFFF:{address}"),
    ipv6.map(lambda address: f"[{address}]"),
    ipv6.map(lambda address: f"{address}%eth0"),
    ipv6.map(lambda address: address.upper()),
    st.ip_addresses(v=6).map(lambda address: address.exploded),
    ipv4.map(lambda address: f" {address} "),
    st.sampled_from(["", "garbage", "127.1", "1.2.3.4.5", "::g", "[", "%", "1.2.3.4:80", "::1]", "[::1", "unknown"]),
    st.tuples(ipv4, st.integers(0, 99999)).map(lambda pair: f"{pair[0]}:{pair[1]}"),
    st.tuples(ipv6, st.integers(0, 99999)).map(lambda pair: f"[{pair[0]}]:{pair[1]}"),
    st.sampled_from(["10.0.0.1:443", "[fd00::1]:443", "1.2.3.4:", "[::1]:", "1.2.3.4:80:90", "[::1]:443x"]),
    st.text(max_size=50),
)
forwarded_for = st.lists(st.lists(address_spellings, max_size=5).map(", ".join), max_size=3)


def _netaddr_parse(text: str) -> netaddr.IPAddress | None:
    """parse_address on netaddr objects: the reference the integer-based one must agree with."""
    text = text.strip()
    text = (text[1:-1] if text.startswith("[") and text.endswith("]") else text).partition("%")[0]
    if not text or len(text) > 45:
        return None
    try:
        address = netaddr.IPAddress(text, flags=netaddr.INET_PTON)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return None
    return address.ipv4() if address.version == 6 and address.is_ipv4_mapped() else address


def _netaddr_hop(text: str) -> netaddr.IPAddress | None:
    """A hop with an unambiguous port removed: `a.b.c.d:port` or `[v6]:port`."""
    text = text.strip()
    host, colon, port = text.rpartition(":")
    if colon and port.isascii() and port.isdigit() and len(port) <= 5:
        if host.count(".") == 3 and ":" not in host and "[" not in host:
            text = host
        elif host.startswith("[") and host.endswith("]") and host.count("[") == host.count("]") == 1:
            text = host
    return _netaddr_parse(text)


def _netaddr_resolve(peer: str | None, forwarded_for: Iterable[str]) -> tuple[netaddr.IPAddress | None, bool]:
    """ClientIpResolver.resolve with a netaddr IPSet of trusted proxies: right to left past trusted hops,
    empty elements skipped, an unreadable hop failing closed (None)."""
    trusted = netaddr.IPSet(TRUSTED_PROXIES)
    client = _netaddr_parse(peer) if peer else None
    if client is None or client not in trusted:
        return client, False
    for hop in reversed([hop for header in forwarded_for for hop in header.split(",")]):
        if not hop.strip():
            continue
        address = _netaddr_hop(hop)
        if address is None:
            return None, True
        client = address
        if address not in trusted:
            return address, True
    return client, True


@PROPERTY
@given(address_spellings)
def test_an_address_reads_and_prints_as_netaddr_did(text: str) -> None:
    expected = _netaddr_parse(text)

    address = parse_address(text)

    if expected is None:
        assert address is None
        return
    assert address is not None
    assert (address.version, address.value) == (expected.version, int(expected))
    assert str(address) == f"{address}" == str(expected)
    assert bool(address) == bool(expected)  # the unspecified address is false, as with netaddr


@PROPERTY
@given(st.none() | address_spellings, forwarded_for)
def test_resolution_agrees_with_the_netaddr_resolver(peer: str | None, chain: list[str]) -> None:
    expected, expected_trusted = _netaddr_resolve(peer, chain)

    address, trusted = ClientIpResolver(TRUSTED_PROXIES).resolve(peer, chain)

    assert trusted == expected_trusted
    assert (None if address is None else str(address)) == (None if expected is None else str(expected))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        (" 192.0.2.1 ", "192.0.2.1"),
        # The longest address text there is (45 characters): read, not cut off by the length bound.
        ("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
        ("[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ],
)
def test_addresses_are_normalized(text: str, expected: str) -> None:
    assert str(parse_address(text)) == expected


@pytest.mark.parametrize(
    "text", ["", "garbage", "127.1", "1.2.3.4.5", "::g", "1.2.3.4:80", "x" * 100, "::1]", "[::1", "[]", "[[::1]]"]
)
def test_unreadable_addresses_are_none(text: str) -> None:
    assert parse_address(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("192.0.2.1:5060", "192.0.2.1"), (" [2001:db8::1]:443 ", "2001:db8::1"), ("[::ffff:10.1.2.3]:80", "10.1.2.3"),
     ("[2001:db8::1]", "2001:db8::1"), ("2001:db8::1", "2001:db8::1")],
)
def test_a_forwarded_hop_loses_an_unambiguous_port(text: str, expected: str) -> None:
    assert str(parse_forwarded_hop(text)) == expected


@pytest.mark.parametrize(
    "text", ["::1]", "[::1", "1.2.3.4:", "[::1]:", "1.2.3.4:80:90", "[::1]:443x", "2001:db8::1]:443", "unknown", "_x"]
)
def test_an_ambiguous_or_unreadable_hop_is_none(text: str) -> None:
    assert parse_forwarded_hop(text) is None


@pytest.mark.parametrize("hop", ["10.0.0.1:443", "[::1]:443"])
def test_a_hop_with_a_port_is_read_as_its_address(hop: str) -> None:
    resolver = ClientIpResolver(["127.0.0.0/8", "10.0.0.0/8", "::1"])
    address, trusted = resolver.resolve("127.0.0.1", [f"203.0.113.7, {hop}"])
    assert (str(address), trusted) == ("203.0.113.7", True)


@pytest.mark.parametrize("hop", ["::1]", "garbage", "1.2.3.4:", "unknown", "[::1]:443x"])
def test_an_unreadable_hop_fails_closed_instead_of_naming_the_proxy(hop: str) -> None:
    resolver = ClientIpResolver(["127.0.0.0/8"])
    assert resolver.resolve("127.0.0.1", [f"203.0.113.7, {hop}"]) == (None, True)
    assert resolver.resolve("127.0.0.1", [hop, "203.0.113.7"])[0] == parse_address("203.0.113.7")


def test_empty_elements_in_forwarded_for_are_skipped() -> None:
    resolver = ClientIpResolver(["10.0.0.0/8"])
    address, _ = resolver.resolve("10.0.0.1", [", 203.0.113.7, ,", " ", "10.0.0.2,"])
    assert str(address) == "203.0.113.7"


def test_untrusted_peer_is_the_client_whatever_it_forwards() -> None:
    resolver = ClientIpResolver(["10.0.0.0/8"])
    address, trusted = resolver.resolve("192.0.2.1", ["203.0.113.7"])
    assert (str(address), trusted) == ("192.0.2.1", False)


def test_chain_of_trusted_hops_is_walked_right_to_left() -> None:
    resolver = ClientIpResolver(["10.0.0.0/8"])
    address, trusted = resolver.resolve("10.0.0.1", ["198.51.100.1, 203.0.113.7", "10.0.0.3, 10.0.0.2"])
    assert (str(address), trusted) == ("203.0.113.7", True)


def test_all_hops_trusted_gives_the_leftmost() -> None:
    resolver = ClientIpResolver(["10.0.0.0/8"])
    address, _ = resolver.resolve("10.0.0.1", ["10.0.0.9, 10.0.0.2"])
    assert str(address) == "10.0.0.9"


def test_empty_forwarded_for_from_a_trusted_peer_gives_the_peer() -> None:
    resolver = ClientIpResolver(["10.0.0.0/8"])
    address, _ = resolver.resolve("10.0.0.1", [])
    assert str(address) == "10.0.0.1"
