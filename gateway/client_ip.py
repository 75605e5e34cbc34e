"""Who is calling: the TCP peer, or the address a trusted proxy says it forwarded for."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import NamedTuple

import netaddr

from gateway.ranges import compile_ranges

_IPV4_WITH_PORT = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,3}){3}):[0-9]{1,5}")
_BRACKETED_WITH_PORT = re.compile(r"\[([^\[\]]*)\]:[0-9]{1,5}")


class ClientAddress(NamedTuple):
    """An address parsed once: its IP version, its value as an integer, and its canonical text.

    The text is netaddr's spelling (IPv6 compressed the way netaddr prints it), because it is shown to callers
    in 403 details and stored as a token's last-used address.
    """

    version: int
    value: int
    text: str

    def __str__(self) -> str:
        return self.text

    def __bool__(self) -> bool:
        # As netaddr.IPAddress: the unspecified address (0.0.0.0, ::) is false, so
        # `client_ip or 'this address'` reads the same as it did with netaddr.
        return self.value != 0


@functools.lru_cache(maxsize=16384)
def parse_address(text: str) -> ClientAddress | None:
    """An address with any IPv6 zone and a pair of brackets removed and IPv4-mapped IPv6 turned into IPv4.

    Cached: a connection's peer, and a proxy's clients, come back request after request.
    """
    text = text.strip()
    if text[:1] == "[" and text[-1:] == "]":
        text = text[1:-1]
    text = text.partition("%")[0]
    if not text or len(text) > 45:
        return None
    try:
        address = netaddr.IPAddress(text, flags=netaddr.INET_PTON)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return None
    if address.version == 6 and address.is_ipv4_mapped():
        address = address.ipv4()
    return ClientAddress(address.version, int(address), str(address))


def parse_forwarded_hop(text: str) -> ClientAddress | None:
    """One `X-Forwarded-For` element: an address, with a port removed where that is unambiguous (Azure and
    some load balancers write `192.0.2.1:5060` or `[2001:db8::1]:443`). None for anything else."""
    text = text.strip()
    if match := _IPV4_WITH_PORT.fullmatch(text) or _BRACKETED_WITH_PORT.fullmatch(text):
        text = match[1]
    return parse_address(text)


class ClientIpResolver:
    """Believes `X-Forwarded-For` only from `trusted_proxies`, walking it right to left past trusted hops.

    A hop that cannot be read fails closed: the client address is unknown (None), which no allowed range
    matches. Taking the last readable hop instead would name the trusted proxy itself as the client, and a
    token limited to the proxies' network would then accept anyone behind them.
    """

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self._trusted = compile_ranges(trusted_proxies)

    def is_trusted(self, address: ClientAddress) -> bool:
        return self._trusted is not None and address in self._trusted

    def resolve(
        self, peer: str | None, forwarded_for: Iterable[str] = ()
    ) -> tuple[ClientAddress | None, bool]:
        """The client address, and whether the peer is a trusted proxy (whose forwarding headers count)."""
        address = parse_address(peer) if peer else None
        if address is None or not self.is_trusted(address):
            return address, False
        return self._walk_forwarded_for(address, forwarded_for), True

    def _walk_forwarded_for(self, client: ClientAddress, forwarded_for: Iterable[str]) -> ClientAddress | None:
        hops = [hop for header in forwarded_for for hop in header.split(",")]
        for hop in reversed(hops):
            if not hop.strip():
                continue  # RFC 9110 5.6.1: empty list elements are ignored
            address = parse_forwarded_hop(hop)
            if address is None:
                return None
            client = address
            if not self.is_trusted(address):
                return address
        return client
