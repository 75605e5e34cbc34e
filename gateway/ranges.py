"""Allowed IP ranges: strict parsing, normalized display, and fast membership tests."""

from __future__ import annotations

from collections.abc import Iterable

import netaddr

MAX_RANGES = 100


class RangeError(ValueError):
    pass


def normalize_range(text: str) -> str:
    """`10.0.0.5/8` -> `10.0.0.0/8`, `10.1.2.3` -> `10.1.2.3/32`, `2001:db8::1` -> `2001:db8::1/128`."""
    if not isinstance(text, str) or not text or text != text.strip() or len(text) > 64:
        raise RangeError(f"{text!r} is not an IPv4/IPv6 address or CIDR")
    address, slash, prefix = text.partition("/")
    try:
        ip = netaddr.IPAddress(address, flags=netaddr.INET_PTON)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise RangeError(f"{text!r} is not an IPv4/IPv6 address or CIDR") from None
    width = 32 if ip.version == 4 else 128
    if slash and (not (prefix.isascii() and prefix.isdigit()) or len(prefix) > 3 or int(prefix) > width):
        raise RangeError(f"{text!r} has an invalid prefix length /{prefix}")
    network = netaddr.IPNetwork(f"{ip}/{int(prefix) if slash else width}").cidr
    if network.version == 6 and network.prefixlen >= 96 and network.ip.is_ipv4_mapped():
        network = netaddr.IPNetwork(f"{network.ip.ipv4()}/{network.prefixlen - 96}")
    return str(network)


def normalize_ranges(items: Iterable[str]) -> tuple[str, ...]:
    normalized: dict[str, None] = {}
    for item in items:
        normalized[normalize_range(item)] = None
    return tuple(normalized)


def compile_ranges(ranges: Iterable[str]) -> netaddr.IPSet | None:
    """An IPSet for membership tests, or None when the token may call from anywhere.

    IPv4-mapped ranges were stored in their IPv4 form and client addresses are unmapped the same way
    (see client_ip), so one IPv4 range covers both spellings of an address.
    """
    networks = [netaddr.IPNetwork(text) for text in ranges]
    return netaddr.IPSet(networks) if networks else None
