"""Allowed IP ranges: strict parsing, normalized display, and fast membership tests."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from typing import Protocol

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


class Address(Protocol):
    """What a membership test needs of an address (client_ip.ClientAddress has it)."""

    @property
    def version(self) -> int: ...

    @property
    def value(self) -> int: ...


class AllowedRanges:
    """Networks as sorted, merged integer intervals per IP version: a membership test is one bisect.

    netaddr's IPSet answers the same question by building an IPNetwork for every supernet of the address,
    about 20 µs a call; this is well under a microsecond, and the check runs on every request.
    """

    __slots__ = ("_ends", "_starts")

    def __init__(self, networks: Iterable[netaddr.IPNetwork]) -> None:
        intervals: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for network in networks:
            intervals[network.version].append((network.first, network.last))
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        for version, pairs in intervals.items():
            starts: list[int] = []
            ends: list[int] = []
            for start, end in sorted(pairs):
                if ends and start <= ends[-1] + 1:
                    ends[-1] = max(ends[-1], end)  # overlapping or adjacent: one interval
                else:
                    starts.append(start)
                    ends.append(end)
            self._starts[version] = starts
            self._ends[version] = ends

    def __contains__(self, address: Address) -> bool:
        value = address.value
        index = bisect_right(self._starts[address.version], value) - 1
        return index >= 0 and value <= self._ends[address.version][index]

    def __repr__(self) -> str:
        spans = [
            f"{netaddr.IPAddress(start, version)}-{netaddr.IPAddress(end, version)}"
            for version in (4, 6)
            for start, end in zip(self._starts[version], self._ends[version], strict=True)
        ]
        return f"AllowedRanges({spans})"


def compile_ranges(ranges: Iterable[str]) -> AllowedRanges | None:
    """The ranges ready for membership tests, or None when the token may call from anywhere.

    IPv4-mapped ranges were stored in their IPv4 form and client addresses are unmapped the same way
    (see client_ip), so one IPv4 range covers both spellings of an address.
    """
    networks = [netaddr.IPNetwork(text) for text in ranges]
    return AllowedRanges(networks) if networks else None
