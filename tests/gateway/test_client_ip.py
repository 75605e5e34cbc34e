"""The client-address resolver on its own: right-to-left walking, trust, and odd spellings."""

from __future__ import annotations

import pytest

from gateway.client_ip import ClientIpResolver, parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        (" 192.0.2.1 ", "192.0.2.1"),
    ],
)
def test_addresses_are_normalized(text: str, expected: str) -> None:
    assert str(parse_address(text)) == expected


@pytest.mark.parametrize("text", ["", "garbage", "127.1", "1.2.3.4.5", "::g", "1.2.3.4:80", "x" * 100])
def test_unreadable_addresses_are_none(text: str) -> None:
    assert parse_address(text) is None


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
