"""Allowed ranges: the bisect structure answers exactly what netaddr's IPSet answered before it."""

from __future__ import annotations

import ipaddress

import netaddr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.client_ip import ClientAddress, parse_address
from gateway.ranges import RangeError, compile_ranges, normalize_range, normalize_ranges

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


NOT_AN_ADDRESS = "is not an IPv4/IPv6 address or CIDR"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Surrounding space is refused as such, before the prefix is read ("8 " would be a bad prefix).
        ("10.0.0.0/8 ", f"'10.0.0.0/8 ' {NOT_AN_ADDRESS}"),
        (" 10.0.0.0/8", f"' 10.0.0.0/8' {NOT_AN_ADDRESS}"),
        ("", f"'' {NOT_AN_ADDRESS}"),
        # At most 64 characters: a 64-character text is read (and its prefix refused), a 65-character one is not.
        ("10.0.0.0/" + "0" * 55, "'10.0.0.0/" + "0" * 55 + "' has an invalid prefix length /" + "0" * 55),
        ("10.0.0.0/" + "0" * 56, "'10.0.0.0/" + "0" * 56 + f"' {NOT_AN_ADDRESS}"),
        ("10.0.0.0/33", "'10.0.0.0/33' has an invalid prefix length /33"),
        ("2001:db8::/129", "'2001:db8::/129' has an invalid prefix length /129"),
        ("10.0.0.0/-1", "'10.0.0.0/-1' has an invalid prefix length /-1"),
        ("10.0.0.0/", "'10.0.0.0/' has an invalid prefix length /"),
        ("10.0.0.0/٣", "'10.0.0.0/٣' has an invalid prefix length /٣"),
        ("10.0.0.0/0008", "'10.0.0.0/0008' has an invalid prefix length /0008"),
        ("127.1", f"'127.1' {NOT_AN_ADDRESS}"),
        ("010.0.0.1", f"'010.0.0.1' {NOT_AN_ADDRESS}"),
    ],
)
def test_a_bad_range_is_refused_with_a_message_naming_it(text: str, message: str) -> None:
    with pytest.raises(RangeError) as refused:
        normalize_range(text)
    assert str(refused.value) == message


@pytest.mark.parametrize("value", [5, None, 10.0, b"10.0.0.0/8", ["10.0.0.0/8"]])
def test_a_range_that_is_not_text_is_a_range_error(value: object) -> None:
    with pytest.raises(RangeError) as refused:
        normalize_range(value)  # type: ignore[arg-type]
    assert str(refused.value) == f"{value!r} {NOT_AN_ADDRESS}"


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("10.0.0.5/8", "10.0.0.0/8"),
        ("10.1.2.3", "10.1.2.3/32"),
        ("010.0.0.0/008", None),
        ("2001:db8::1", "2001:db8::1/128"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("::ffff:10.1.2.3", "10.1.2.3/32"),
        ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
        ("::ffff:0:0/95", "::fffe:0:0/95"),  # /95 reaches outside the mapped block: stays IPv6
        ("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"),
        ("10.0.0.0/000", "0.0.0.0/0"),
    ],
)
def test_ranges_normalize_to_one_spelling(text: str, normalized: str | None) -> None:
    if normalized is None:
        with pytest.raises(RangeError):
            normalize_range(text)
    else:
        assert normalize_range(text) == normalized


def test_normalize_ranges_keeps_the_first_of_each_and_the_order() -> None:
    assert normalize_ranges(["10.0.0.5/8", "::1", "10.9.9.9/8", "192.0.2.1"]) == (
        "10.0.0.0/8", "::1/128", "192.0.2.1/32"
    )
    assert normalize_ranges([]) == ()


def test_compiled_ranges_show_their_merged_spans() -> None:
    compiled = compile_ranges(["10.0.0.0/9", "10.128.0.0/9", "192.0.2.7", "2001:db8::/127"])
    assert repr(compiled) == (
        "AllowedRanges(['10.0.0.0-10.255.255.255', '192.0.2.7-192.0.2.7', '2001:db8::-2001:db8::1'])"
    )


def test_ranges_one_address_apart_stay_apart() -> None:
    compiled = compile_ranges(["192.0.2.1", "192.0.2.3", "192.0.2.4/31"])
    assert repr(compiled) == "AllowedRanges(['192.0.2.1-192.0.2.1', '192.0.2.3-192.0.2.5'])"
    assert compiled is not None
    assert [_address(f"192.0.2.{last}") in compiled for last in range(7)] == [
        False, True, False, True, True, True, False
    ]


def test_low_ipv6_spans_show_as_ipv6() -> None:
    """An IPv6 span near :: has integer edges that would read as IPv4 if the version were guessed."""
    assert repr(compile_ranges(["::/127", "0.0.0.0/31"])) == "AllowedRanges(['0.0.0.0-0.0.0.1', '::-::1'])"
