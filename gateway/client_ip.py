"""Who is calling: the TCP peer, or the address a trusted proxy says it forwarded for."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import netaddr


@functools.lru_cache(maxsize=16384)
def parse_address(text: str) -> netaddr.IPAddress | None:
    """An address with any IPv6 zone and brackets removed and IPv4-mapped IPv6 turned into IPv4."""
    text = text.strip().strip("[]").partition("%")[0]
    if not text or len(text) > 45:
        return None
    try:
        address = netaddr.IPAddress(text, flags=netaddr.INET_PTON)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return None
    if address.version == 6 and address.is_ipv4_mapped():
        return address.ipv4()
    return address


class ClientIpResolver:
    """Believes `X-Forwarded-For` only from `trusted_proxies`, walking it right to left past trusted hops."""

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        networks = list(trusted_proxies)
        self._trusted = netaddr.IPSet(networks) if networks else None

    def is_trusted(self, address: netaddr.IPAddress) -> bool:
        return self._trusted is not None and address in self._trusted

    def resolve(
        self, peer: str | None, forwarded_for: Iterable[str] = ()
    ) -> tuple[netaddr.IPAddress | None, bool]:
        """The client address, and whether the peer is a trusted proxy (whose forwarding headers count)."""
        address = parse_address(peer) if peer else None
        if address is None or not self.is_trusted(address):
            return address, False
        return self._walk_forwarded_for(address, forwarded_for), True

    def _walk_forwarded_for(self, client: netaddr.IPAddress, forwarded_for: Iterable[str]) -> netaddr.IPAddress:
        hops = [hop for header in forwarded_for for hop in header.split(",")]
        for hop in reversed(hops):
            address = parse_address(hop)
            if address is None:
                # Garbage in the chain: the last hop we could read is the most we can vouch for.
                return client
            client = address
            if not self.is_trusted(address):
                return address
        return client
