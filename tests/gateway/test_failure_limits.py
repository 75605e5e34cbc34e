"""The failure limits' source key: one per IPv4 address, one per IPv6 /64, whatever the spelling."""

from __future__ import annotations

import netaddr
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.client_ip import parse_address
from gateway.failure_limits import source_key

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)


@PROPERTY
@given(
    st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
        st.ip_addresses(v=4).map(lambda address: f"::ffff:{address}"),
        st.integers(0, 2**64 - 1).map(lambda low: str(netaddr.IPAddress(low, 6))),  # ::/64, spelled ::a.b.c.d
    )
)
def test_source_key_is_the_netaddr_spelling_of_the_address_or_its_64(text: str) -> None:
    address = parse_address(text)
    assert address is not None
    reference = netaddr.IPAddress(address.value, address.version)
    expected = str(netaddr.IPNetwork(f"{reference}/64").cidr) if reference.version == 6 else str(reference)

    assert source_key(address) == expected


def test_addresses_in_one_ipv6_64_share_a_key() -> None:
    keys = {source_key(parse_address(text)) for text in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9")}

    assert keys == {"2001:db8:1:2::/64"}


def test_no_address_is_unknown() -> None:
    assert source_key(None) == "unknown"
