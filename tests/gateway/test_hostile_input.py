"""Hostile input: every parser a client can reach, fed whatever hypothesis can think of, and a few hostile
requests through the real proxy. Parsers answer or refuse the way they document, and never fail otherwise.

The properties run derandomized and without an example database, so every run tries the same inputs.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import string

import netaddr
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.client_ip import ClientAddress, ClientIpResolver, parse_address, parse_forwarded_hop
from gateway.credentials import MAX_AUTHORIZATION_LENGTH, presented_token
from gateway.problems import GatewayError
from gateway.ranges import RangeError, compile_ranges, normalize_range
from gateway.token_format import ID_PATTERN, PREFIX_PATTERN, TokenString, issue_token, parse_token
from tests.conftest import Gateway, GatewayFactory, Upstream, send_raw

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
PREFIX = "gw"
TRUSTED_PROXIES = ["10.0.0.0/8", "fd00::/8"]

# --- strategies ---------------------------------------------------------------------------------------------

# What a header value can hold once aiohttp has decoded it: text, bytes read as latin-1, and bytes read as
# UTF-8 with the undecodable ones as lone surrogates (aiohttp's own choice).
header_text = st.one_of(
    st.text(),
    st.binary().map(lambda raw: raw.decode("latin-1")),
    st.binary().map(lambda raw: raw.decode("utf-8", "surrogateescape")),
)
base64ish = st.one_of(
    st.binary().map(lambda raw: base64.b64encode(raw).decode()),
    st.text(alphabet=string.ascii_letters + string.digits + "+/=-_ ", max_size=80),
    st.binary().map(lambda raw: base64.b64encode(raw).decode()[:-1]),  # broken padding
)
authorization = st.one_of(
    header_text,
    st.tuples(
        st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "basic", "Token", ""]), header_text
    ).map(" ".join),
    st.tuples(st.sampled_from(["Basic ", "basic  ", " Basic "]), base64ish).map("".join),
    st.integers(min_value=MAX_AUTHORIZATION_LENGTH - 8, max_value=4 * MAX_AUTHORIZATION_LENGTH).map(
        lambda size: "Bearer " + "A" * size
    ),
)
prefixes = st.from_regex(PREFIX_PATTERN, fullmatch=True)
token_ids = st.from_regex(ID_PATTERN, fullmatch=True)

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
address_spellings = st.one_of(
    ipv4.map(str),
    ipv6.map(str),
    ipv4.map(lambda address: f"::ffff:{address}"),
    ipv6.map(lambda address: f"[{address}]"),
    ipv6.map(lambda address: f"{address}%eth0"),
    ipv6.map(lambda address: f"[{address}%25en0]"),
    ipv4.map(lambda address: f" {address} "),
    ipv4.map(lambda address: f"{address}:8080"),
    st.sampled_from(
        ["", "unknown", "_hidden", "127.1", "0x7f.1", "1.2.3.4.5", "::g", "[", "]", "%", "[::1", "::1]"]
    ),
    st.text(max_size=60),
)
forwarded_for = st.lists(
    st.lists(address_spellings, max_size=5).map(", ".join) | st.text(max_size=80), max_size=4
)


def _expected_membership(address: ipaddress.IPv4Address | ipaddress.IPv6Address, network: str) -> bool:
    """`ipaddress`'s answer, after the gateway's rule: an IPv4-mapped address or range means its IPv4 form."""
    candidate = (
        address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else address
    )
    parsed = ipaddress.ip_network(network)
    return candidate.version == parsed.version and candidate in parsed


def _canonical(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network


# --- credentials --------------------------------------------------------------------------------------------


@PROPERTY
@given(authorization)
def test_authorization_header_gives_a_token_string_or_a_401(value: str) -> None:
    try:
        token = presented_token(value, PREFIX)
    except GatewayError as error:
        expected = 431 if len(value) > MAX_AUTHORIZATION_LENGTH else 401
        assert error.status == expected, (error, value)
        return
    assert isinstance(token, str) and token
    assert len(value) <= MAX_AUTHORIZATION_LENGTH


@PROPERTY
@given(st.binary(max_size=200))
def test_basic_credentials_of_any_bytes_give_a_string_or_a_401(raw: bytes) -> None:
    value = "Basic " + base64.b64encode(raw).decode()
    try:
        token = presented_token(value, PREFIX)
    except GatewayError as error:
        assert error.status == 401
        return
    assert token in raw.decode("utf-8")


@PROPERTY
@given(
    token_ids,
    st.text(max_size=20).filter(lambda other: ":" not in other and not other.startswith(PREFIX + "_")),
)
def test_a_token_is_found_as_bearer_and_in_either_basic_field(token_id: str, other: str) -> None:
    token = str(issue_token(PREFIX, token_id))

    assert presented_token(f"Bearer {token}", PREFIX) == token
    for pair in (f"{token}:{other}", f"{other}:{token}"):
        assert presented_token("Basic " + base64.b64encode(pair.encode()).decode(), PREFIX) == token


# --- token format -------------------------------------------------------------------------------------------


@PROPERTY
@given(header_text, prefixes)
def test_parse_token_never_raises(text: str, prefix: str) -> None:
    parsed = parse_token(text, prefix)

    assert parsed is None or str(parsed) == text


@PROPERTY
@given(prefixes, token_ids)
def test_issued_tokens_round_trip(prefix: str, token_id: str) -> None:
    token = issue_token(prefix, token_id)

    assert parse_token(str(token), prefix) == token
    assert token_id in repr(token) and token.secret not in repr(token)


@PROPERTY
@given(prefixes, token_ids, st.data())
def test_any_one_character_changed_is_refused(prefix: str, token_id: str, data: st.DataObject) -> None:
    text = str(issue_token(prefix, token_id))
    position = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    replacement = data.draw(st.characters(codec="utf-8").filter(lambda char: char != text[position]))

    assert parse_token(text[:position] + replacement + text[position + 1 :], prefix) is None


@PROPERTY
@given(prefixes, token_ids)
def test_a_token_of_another_prefix_is_refused(prefix: str, token_id: str) -> None:
    token = issue_token(prefix, token_id)

    assert parse_token(str(token), prefix + "x") is None
    assert isinstance(parse_token(str(token), prefix), TokenString)


# --- client address -----------------------------------------------------------------------------------------


@PROPERTY
@given(st.none() | address_spellings, forwarded_for)
def test_client_ip_resolution_never_raises_and_gives_an_address_or_none(
    peer: str | None, chain: list[str]
) -> None:
    resolver = ClientIpResolver(TRUSTED_PROXIES)

    address, trusted = resolver.resolve(peer, chain)

    assert address is None or isinstance(address, ClientAddress)
    assert isinstance(trusted, bool)
    if address is not None:
        assert not netaddr.IPAddress(address.value, address.version).is_ipv4_mapped(), address
    hops = [parse_forwarded_hop(hop) for header in chain for hop in header.split(",")]
    assert address is None or address == parse_address(peer or "") or address in hops


@PROPERTY
@given(address_spellings, forwarded_for)
def test_forwarded_for_from_an_untrusted_peer_changes_nothing(peer: str, chain: list[str]) -> None:
    resolver = ClientIpResolver(TRUSTED_PROXIES)
    parsed = parse_address(peer)
    assume(parsed is None or not resolver.is_trusted(parsed))

    assert resolver.resolve(peer, chain) == resolver.resolve(peer, []) == (parsed, False)


@PROPERTY
@given(st.sampled_from(["10.0.0.1", "::ffff:10.0.0.1", "[fd00::1]", "fd00::1%eth0"]), forwarded_for)
def test_a_trusted_peer_gives_the_peer_a_hop_it_forwarded_or_none_never_a_proxy_past_garbage(
    peer: str, chain: list[str]
) -> None:
    resolver = ClientIpResolver(TRUSTED_PROXIES)

    address, trusted = resolver.resolve(peer, chain)

    assert trusted is True
    hops = [hop for header in chain for hop in header.split(",") if hop.strip()]
    readable = []
    for hop in reversed(hops):
        parsed = parse_forwarded_hop(hop)
        if parsed is None:
            # Unreadable before any untrusted hop: the client is unknown, never the proxy that passed it on.
            assert address is None
            return
        readable.append(parsed)
        if not resolver.is_trusted(parsed):
            break
    assert address == (readable[-1] if readable else parse_address(peer))


def test_no_trusted_proxies_means_forwarded_for_is_never_believed() -> None:
    address, trusted = ClientIpResolver().resolve("10.0.0.1", ["203.0.113.9"])

    assert (str(address), trusted) == ("10.0.0.1", False)


# --- IP ranges ----------------------------------------------------------------------------------------------


@PROPERTY
@given(
    st.one_of(
        st.text(max_size=80),
        st.tuples(address_spellings, st.text(max_size=5)).map("/".join),
        st.tuples(ipv4.map(str), st.integers(-5, 200).map(str)).map("/".join),
        st.tuples(ipv6.map(str), st.sampled_from(["129", "+8", "٣", "²", "08", " 8", "8 ", "0x8", ""])).map(
            "/".join
        ),
    )
)
def test_normalize_range_refuses_only_with_range_error(text: str) -> None:
    try:
        normalized = normalize_range(text)
    except RangeError:
        return
    assert normalize_range(normalized) == normalized
    ipaddress.ip_network(normalized)  # a CIDR ipaddress reads too


networks = st.one_of(
    st.tuples(ipv4, st.integers(0, 32)),
    st.tuples(ipv6, st.integers(0, 128)),
    st.tuples(ipv4.map(lambda address: ipaddress.IPv6Address(f"::ffff:{address}")), st.integers(96, 128)),
)


@PROPERTY
@given(networks)
def test_valid_networks_normalize_to_their_canonical_cidr(
    network: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int],
) -> None:
    address, prefix = network
    expected = _canonical(ipaddress.ip_network(f"{address}/{prefix}", strict=False))

    normalized = normalize_range(f"{address}/{prefix}")

    assert ipaddress.ip_network(normalized) == expected
    assert normalize_range(normalized) == normalized
    if not (expected.version == 6 and int(expected.network_address) >> 32 == 0):
        # netaddr spells the deprecated IPv4-compatible block (::/96) as ::a.b.c.d; elsewhere both agree.
        assert normalized == str(expected)


@PROPERTY
@given(networks, st.data())
def test_range_membership_agrees_with_ipaddress(
    network: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], data: st.DataObject
) -> None:
    address, prefix = network
    normalized = normalize_range(f"{address}/{prefix}")
    parsed = ipaddress.ip_network(normalized)
    inside = data.draw(
        st.integers(0, parsed.num_addresses - 1).map(lambda offset: parsed.network_address + offset)
    )
    candidates = [
        inside,
        data.draw(ipv4),
        data.draw(ipv6),
        ipaddress.IPv6Address(f"::ffff:{data.draw(ipv4)}"),
    ]
    if isinstance(inside, ipaddress.IPv4Address):
        candidates.append(ipaddress.IPv6Address(f"::ffff:{inside}"))
    compiled = compile_ranges([normalized])
    assert compiled is not None

    for candidate in candidates:
        client = parse_address(str(candidate))  # the proxy's view of the caller: mapped addresses unmapped
        assert client is not None
        assert (client in compiled) == _expected_membership(candidate, normalized), (candidate, normalized)


# --- the real proxy -----------------------------------------------------------------------------------------


def _request(*lines: str | bytes, target: bytes = b"/api/posts") -> bytes:
    head = [b"GET " + target + b" HTTP/1.1", b"Host: gateway.test", b"Connection: close"]
    head += [line.encode() if isinstance(line, str) else line for line in lines]
    return b"\r\n".join(head) + b"\r\n\r\n"


HOSTILE_REQUESTS = {
    "8 KB header value": _request("X-Big: " + "a" * 9000),
    "200 headers": _request(*(f"X-Header-{index}: v" for index in range(200))),
    "5000-char Authorization": _request("Authorization: Bearer " + "A" * 5000),
    "latin-1 bytes in Authorization": _request(b"Authorization: Bearer \xff\xfe\xe9\x80"),
    "broken UTF-8 in Basic": _request(b"Authorization: Basic \xc3\x28" + base64.b64encode(b"\xff:\xfe")),
    "Basic of undecodable bytes": _request(b"Authorization: Basic " + base64.b64encode(b"\xff\xfe:\x80")),
    "Basic with broken base64": _request("Authorization: Basic !!notbase64=="),
    "NUL in Authorization": _request(b"Authorization: Bearer a\x00b"),
    "bare CR in Authorization": _request(b"Authorization: Bearer a\rb"),
    "two Authorization headers": _request("Authorization: Bearer a", "Authorization: Bearer b"),
    "garbage X-Forwarded-For": _request(
        "X-Forwarded-For: 10.0.0.1, [::1%eth0], ::ffff:1.2.3.4, garbage, , %, 999.1.1.1",
        "Authorization: Bearer x",
    ),
    "X-Forwarded-For of 1000 hops": _request("X-Forwarded-For: " + ",".join(["1.1.1.1"] * 1000)),
}


@pytest.mark.parametrize("request_bytes", HOSTILE_REQUESTS.values(), ids=HOSTILE_REQUESTS.keys())
async def test_hostile_request_gets_a_4xx_answer(
    gateway: Gateway, upstream: Upstream, request_bytes: bytes
) -> None:
    status, reply = await send_raw(gateway.proxy, request_bytes)

    assert 400 <= status < 500, reply[:300]
    assert upstream.requests == []


async def test_garbage_forwarded_for_from_an_untrusted_peer_never_reaches_upstream(
    gateway: Gateway, upstream: Upstream
) -> None:
    token = (await gateway.create_token())["token"]
    request = _request(
        f"Authorization: Bearer {token}",
        "X-Forwarded-For: 203.0.113.9, [::1%eth0], garbage,, \xc3\xa9".encode(),
    )

    status, reply = await send_raw(gateway.proxy, request)

    assert status == 200, reply[:300]
    assert upstream.last["headers"]["X-Forwarded-For"] == "127.0.0.1"


@pytest.mark.parametrize("target", [b"http://evil.example/api/posts", b"admin://evil.example/api/posts"])
async def test_absolute_form_target_with_a_valid_token_is_a_4xx(
    gateway: Gateway, upstream: Upstream, target: bytes
) -> None:
    token = (await gateway.create_token())["token"]

    status, reply = await send_raw(gateway.proxy, _request(f"Authorization: Bearer {token}", target=target))

    assert 400 <= status < 500, reply[:300]


async def test_undecodable_header_bytes_are_refused_or_forwarded_unaltered(
    gateway: Gateway, upstream: Upstream
) -> None:
    token = (await gateway.create_token())["token"]

    status, reply = await send_raw(
        gateway.proxy, _request(f"Authorization: Bearer {token}", b"X-Signed: a\xffb")
    )

    assert 400 <= status < 500 or (status == 200 and upstream.last["headers"]["X-Signed"] == "a\udcffb"), (
        reply
    )


async def _through_a_trusted_proxy(
    start_gateway: GatewayFactory, allowed: list[str], *lines: str | bytes
) -> tuple[int, bytes, Gateway]:
    """A valid token limited to `allowed`, sent from 127.0.0.1 configured as a trusted proxy: the resolver
    reads the chain, and the token's ranges show which address it settled on."""
    gateway = await start_gateway(trusted_proxies=["127.0.0.1/32", "::1/128", "10.0.0.0/8"])
    token = (await gateway.create_token(allowed_ip_ranges=allowed))["token"]
    status, reply = await send_raw(gateway.proxy, _request(f"Authorization: Bearer {token}", *lines))
    return status, reply, gateway


GARBAGE_CHAIN = "X-Forwarded-For: 10.0.0.1, [::1%eth0], ::ffff:1.2.3.4, garbage, , %, 999.1.1.1"


@pytest.mark.parametrize(
    ("chain", "client"),
    [
        # Garbage further left is never reached: the first untrusted hop from the right is the client.
        ("X-Forwarded-For: 203.0.113.9, garbage, %, ::ffff:1.2.3.4", "1.2.3.4"),
        # A trusted hop with a zone and brackets is walked past.
        ("X-Forwarded-For: garbage, 198.51.100.7, [::1%eth0]", "198.51.100.7"),
        ("X-Forwarded-For: 198.51.100.7, 127.0.0.1, [::ffff:127.0.0.1]", "198.51.100.7"),
        # Every hop trusted: the leftmost one.
        ("X-Forwarded-For: ::1, 127.0.0.1", "::1"),
    ],
)
async def test_garbage_forwarded_for_from_a_trusted_proxy_resolves_to_the_right_hop(
    start_gateway: GatewayFactory, upstream: Upstream, chain: str, client: str
) -> None:
    status, reply, _ = await _through_a_trusted_proxy(start_gateway, [client], chain)
    assert status == 200, reply[:300]
    assert len(upstream.requests) == 1

    other = "192.0.2.1" if client != "192.0.2.1" else "192.0.2.2"
    status, reply, _ = await _through_a_trusted_proxy(start_gateway, [other], chain)
    assert status == 403, reply[:300]
    body = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert body["code"] == "ip_not_allowed"
    assert body["detail"] == f"This token may not be used from {client}."
    assert len(upstream.requests) == 1


async def test_an_unreadable_hop_from_a_trusted_proxy_leaves_the_client_unknown(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    """No range matches an unknown client, not even the proxy's own; a token without ranges still works."""
    for allowed in (["127.0.0.1"], ["10.0.0.0/8", "::1", "1.2.3.4"]):
        status, reply, _ = await _through_a_trusted_proxy(start_gateway, allowed, GARBAGE_CHAIN)
        assert status == 403, reply[:300]
        body = json.loads(reply.partition(b"\r\n\r\n")[2])
        assert (body["code"], body["detail"]) == ("ip_not_allowed", "This token may not be used from this address.")
    assert upstream.requests == []

    status, reply, _ = await _through_a_trusted_proxy(start_gateway, [], GARBAGE_CHAIN)
    assert status == 200, reply[:300]
    assert len(upstream.requests) == 1


async def test_forwarded_for_of_1000_hops_from_a_trusted_proxy_is_walked_to_its_client(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    chain = "X-Forwarded-For: " + ",".join(["1.1.1.1"] * 999 + ["127.0.0.1"])
    status, reply, _ = await _through_a_trusted_proxy(start_gateway, ["1.1.1.1/32"], chain)
    assert status == 200, reply[:300]
    forwarded = upstream.last["headers"]["X-Forwarded-For"].split(", ")
    # The 998 copies left of the judged client are its own claims: they are not passed on.
    assert forwarded == ["1.1.1.1", "127.0.0.1", "127.0.0.1"]

    status, reply, _ = await _through_a_trusted_proxy(start_gateway, ["127.0.0.1/32"], chain)
    assert status == 403 and b"This token may not be used from 1.1.1.1." in reply, reply[:300]


async def test_forwarded_for_of_1000_trusted_hops_resolves_to_the_leftmost(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    chain = "X-Forwarded-For: " + ",".join(["10.1.2.3"] + ["::1"] * 999)
    status, reply, _ = await _through_a_trusted_proxy(start_gateway, ["10.1.2.3/32"], chain)
    assert status == 200, reply[:300]
    assert len(upstream.requests) == 1

    status, reply, _ = await _through_a_trusted_proxy(start_gateway, ["::1/128"], chain)
    assert status == 403 and b"This token may not be used from 10.1.2.3." in reply, reply[:300]
