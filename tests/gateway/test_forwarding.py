"""Step 5: what reaches the upstream, what comes back, and how upstream failures are answered."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

from tests.conftest import Gateway, GatewayFactory, Upstream, send_raw


async def test_method_body_and_query_reach_the_upstream(gateway: Gateway, upstream: Upstream) -> None:
    token = (await gateway.create_token())["token"]
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        response = await gateway.call(token, "/api/posts/1?x=1", method=method, data=b'{"a": 1}',
                                      headers={"Content-Type": "application/json"})
        assert response.status == 200
        assert upstream.last["method"] == method
        assert upstream.last["raw_path"] == "/api/posts/1?x=1"
        assert upstream.last["body"] == '{"a": 1}'
        assert upstream.last["headers"]["Content-Type"] == "application/json"


async def test_credentials_are_removed_and_gateway_headers_set(gateway: Gateway, upstream: Upstream) -> None:
    created = await gateway.create_token(access_level="editorial")
    response = await gateway.call(
        created["token"],
        headers={
            "X-Gateway-Token-Id": "forged",
            "x-gateway-access-level": "administrative",
            "X-Gateway-Anything": "forged",
            "X-Forwarded-Host": "forged.example",
            "X-Forwarded-Proto": "gopher",
            "Host": "api.example.com",
            "X-Custom": "kept",
        },
    )
    assert response.status == 200
    headers = upstream.last["headers"]
    names = [name.lower() for name, _ in upstream.last["header_pairs"]]
    assert "authorization" not in names
    assert names.count("x-gateway-token-id") == 1 and names.count("x-gateway-access-level") == 1
    assert "x-gateway-anything" not in names
    assert headers["X-Gateway-Token-Id"] == created["id"]
    assert headers["X-Gateway-Access-Level"] == "editorial"
    assert headers["Host"] == upstream.url.removeprefix("http://")
    assert headers["X-Forwarded-Host"] == "api.example.com"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Custom"] == "kept"


async def test_hop_by_hop_headers_are_dropped_both_ways(gateway: Gateway, upstream: Upstream) -> None:
    token = (await gateway.create_token())["token"]
    request = (
        "GET /api/posts HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Connection: keep-alive, X-Private\r\nX-Private: secret-hop\r\nKeep-Alive: timeout=5\r\n"
        "TE: trailers\r\nProxy-Authorization: Basic abc\r\nUpgrade: websocket\r\nX-Kept: 1\r\n\r\n"
    )
    status, reply = await send_raw(gateway.proxy, request.encode())
    assert status == 200
    names = {name.lower() for name, _ in upstream.last["header_pairs"]}
    assert not names & {"x-private", "keep-alive", "te", "proxy-authorization", "upgrade"}
    assert "x-kept" in names
    head = reply.split(b"\r\n\r\n", 1)[0].lower()
    assert b"x-upstream: yes" in head and b"set-cookie: session=upstream" in head


@pytest.mark.parametrize("code", [201, 204, 304, 404, 418, 500, 503])
async def test_upstream_status_is_passed_through(gateway: Gateway, code: int) -> None:
    token = (await gateway.create_token())["token"]
    response = await gateway.call(token, f"/status/{code}")
    assert response.status == code
    body = await response.read()
    if code in (204, 304):
        assert body == b""


async def test_head_request_gets_headers_and_no_body(gateway: Gateway) -> None:
    token = (await gateway.create_token())["token"]
    request = f"HEAD /download?bytes=1000 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    status, reply = await send_raw(gateway.proxy, request.encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert status == 200
    assert b"content-length: 1000" in head.lower()
    assert body == b""


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_upstream_refusing_connections_gets_502(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(upstream=f"http://127.0.0.1:{_closed_port()}")
    token = (await gateway.create_token())["token"]
    response = await gateway.call(token)
    assert response.status == 502
    assert response.content_type == "application/problem+json"
    assert (await response.json())["code"] == "upstream_unavailable"


async def test_upstream_answer_in_a_transfer_coding_other_than_chunked_gets_502(
    start_gateway: GatewayFactory,
) -> None:
    """The coding would be lost with the hop-by-hop Transfer-Encoding: refused, never relayed corrupt."""

    async def gzip_coded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nxxxxx\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(gzip_coded, "127.0.0.1", 0)
    try:
        gateway = await start_gateway(upstream=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        token = (await gateway.create_token())["token"]
        response = await gateway.call(token)
        assert response.status == 502
        assert (await response.json())["code"] == "upstream_unavailable"
    finally:
        server.close()
        await server.wait_closed()


async def test_slow_upstream_gets_504(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(upstream_timeout=0.2)
    token = (await gateway.create_token())["token"]
    response = await gateway.call(token, "/slow?seconds=3")
    assert response.status == 504
    assert (await response.json())["code"] == "upstream_timeout"


async def test_large_upload_is_streamed_to_the_upstream_intact(gateway: Gateway, upstream: Upstream) -> None:
    token = (await gateway.create_token())["token"]
    size = 60 * 1024 * 1024
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    expected = hashlib.sha256()

    async def body():  # type: ignore[no-untyped-def]
        sent = 0
        while sent < size:
            expected.update(block)
            sent += len(block)
            yield block

    response = await gateway.call(token, "/sha256", method="POST", data=body())
    assert response.status == 200
    reply = await response.json()
    assert reply == {"sha256": expected.hexdigest(), "size": size}


async def test_large_upload_with_content_length_is_streamed(gateway: Gateway, upstream: Upstream) -> None:
    token = (await gateway.create_token())["token"]
    payload = bytes(range(256)) * (4 * 1024 * 16)  # 16 MiB, sent with Content-Length
    response = await gateway.call(token, "/sha256", method="PUT", data=io.BytesIO(payload),
                                  headers={"Content-Length": str(len(payload))})
    assert (await response.json()) == {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    assert upstream.last["headers"]["Content-Length"] == str(len(payload))


async def test_large_download_is_streamed_to_the_client_intact(gateway: Gateway) -> None:
    token = (await gateway.create_token())["token"]
    size = 60 * 1024 * 1024
    response = await gateway.call(token, f"/download?bytes={size}")
    assert response.status == 200
    assert response.headers["Content-Length"] == str(size)
    digest, received = hashlib.sha256(), 0
    async for chunk in response.content.iter_chunked(1 << 16):
        digest.update(chunk)
        received += len(chunk)
    block = bytes(range(256)) * 256
    expected = hashlib.sha256()
    for offset in range(0, size, len(block)):
        expected.update(block[: min(len(block), size - offset)])
    assert received == size
    assert digest.hexdigest() == expected.hexdigest()


async def test_client_disconnect_mid_download_leaves_the_gateway_serving(gateway: Gateway) -> None:
    token = (await gateway.create_token())["token"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy.server.port)
    writer.write(f"GET /download?bytes={50 * 1024 * 1024} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    await writer.drain()
    await reader.read(100_000)
    writer.close()
    for _ in range(3):
        assert (await gateway.call(token)).status == 200


def _upstream_names(upstream: Upstream) -> list[str]:
    return [name.lower() for name, _ in upstream.last["header_pairs"]]


METHOD_OVERRIDES = ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "x_http_method_override"]
PATH_REWRITES = ["X-Original-URL", "X-Rewrite-URL", "X-Original-URI", "X-Forwarded-Uri", "X_Original_URL"]
CLIENT_ADDRESSES = [
    "Forwarded", "X-Real-IP", "X-Client-IP", "True-Client-IP", "CF-Connecting-IP", "X-Cluster-Client-IP",
    "Forwarded-For", "X-Forwarded", "X-Original-Forwarded-For", "Fastly-Client-IP", "X-ProxyUser-Ip",
    "X_Real_IP", "True_Client_IP", "X_Forwarded_For", "x_forwarded", "Client-IP",
]


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted peer", "trusted peer"])
async def test_method_path_and_address_claims_never_reach_the_upstream(
    start_gateway: GatewayFactory, upstream: Upstream, trusted: bool
) -> None:
    """The upstream could read any of these as the method, path or client address: none of them was judged."""
    gateway = await start_gateway(trusted_proxies="127.0.0.0/8" if trusted else "")
    token = (await gateway.create_token(access_level="read_only"))["token"]
    claims = {name: "203.0.113.9" for name in CLIENT_ADDRESSES}
    claims |= {name: "DELETE" for name in METHOD_OVERRIDES} | {name: "/api/admin/users" for name in PATH_REWRITES}

    response = await gateway.call(token, "/api/posts", headers={**claims, "X-Kept": "1"})

    assert response.status == 200
    names = _upstream_names(upstream)
    assert not set(names) & {name.lower() for name in claims}
    assert "x-kept" in names
    assert upstream.last["method"] == "GET"
    assert upstream.last["headers"]["X-Forwarded-For"] == "127.0.0.1"


@pytest.mark.parametrize(
    "name",
    ["X_Gateway_Token_Id", "X-Gateway_Access-Level", "x.gateway.token.id", "X_Forwarded_Host", "Proxy_Authorization"],
)
async def test_a_header_spelled_with_underscores_cannot_stand_in_for_one_the_gateway_owns(
    gateway: Gateway, upstream: Upstream, name: str
) -> None:
    """gunicorn, Werkzeug and PHP read `X_Gateway_Token_Id` as X-Gateway-Token-Id: it is dropped like it."""
    created = await gateway.create_token(access_level="editorial")

    response = await gateway.call(created["token"], headers={name: "forged", "Host": "api.example", "X_Custom": "kept"})

    assert response.status == 200
    assert name.lower() not in _upstream_names(upstream)
    assert "forged" not in [value for _, value in upstream.last["header_pairs"]]
    assert upstream.last["headers"]["X-Gateway-Token-Id"] == created["id"]
    assert upstream.last["headers"]["X-Gateway-Access-Level"] == "editorial"
    assert upstream.last["headers"]["X-Forwarded-Host"] == "api.example"
    assert upstream.last["headers"]["X_Custom"] == "kept"  # folds onto no header the gateway owns or drops


async def test_a_connection_header_naming_a_header_with_underscores_drops_it(
    gateway: Gateway, upstream: Upstream
) -> None:
    token = (await gateway.create_token())["token"]
    request = (
        f"GET /api/posts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Connection: X-Private\r\nX_Private: secret-hop\r\nConnection: close\r\n\r\n"
    )
    status, _ = await send_raw(gateway.proxy, request.encode())
    assert status == 200
    assert "x_private" not in _upstream_names(upstream)


@pytest.mark.parametrize(
    "query",
    ["_method=DELETE", "a=1&_METHOD=delete", "_m%65thod=DELETE", "a=1;_method=DELETE", "X-HTTP-Method-Override=PUT",
     "x_http_method=PATCH", "_HttpMethod=DELETE", "_method"],
)
async def test_a_method_override_in_the_query_string_gets_400(
    gateway: Gateway, upstream: Upstream, query: str
) -> None:
    """Symfony, Laravel and Express method-override would run the named method on a POST judged as POST."""
    token = (await gateway.create_token(access_level="editorial"))["token"]

    status, reply = await send_raw(
        gateway.proxy,
        f"POST /api/posts?{query} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
    )

    assert status == 400
    assert b'"code": "method_override"' in reply
    assert upstream.requests == []


async def test_query_parameters_that_only_mention_a_method_are_forwarded(gateway: Gateway, upstream: Upstream) -> None:
    token = (await gateway.create_token())["token"]
    response = await gateway.call(token, "/api/payments?method=card&sort=method_name&payment_method=x")
    assert response.status == 200
    assert upstream.last["raw_path"] == "/api/payments?method=card&sort=method_name&payment_method=x"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_an_empty_body_declared_with_content_length_0_is_forwarded_so(
    gateway: Gateway, upstream: Upstream, method: str
) -> None:
    """Some upstreams answer a POST without Content-Length with 411 Length Required."""
    token = (await gateway.create_token())["token"]
    request = (
        f"{method} /api/posts/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    status, _ = await send_raw(gateway.proxy, request.encode())
    assert status == 200
    assert upstream.last["method"] == method
    assert upstream.last["headers"]["Content-Length"] == "0"
    assert "Transfer-Encoding" not in upstream.last["headers"]
    assert upstream.last["body"] == ""


async def test_a_request_without_body_framing_gets_none_upstream(gateway: Gateway, upstream: Upstream) -> None:
    token = (await gateway.create_token())["token"]
    request = f"DELETE /api/posts/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    status, _ = await send_raw(gateway.proxy, request.encode())
    assert status == 200
    assert "Content-Length" not in upstream.last["headers"] and "Transfer-Encoding" not in upstream.last["headers"]


CREATE_ONLY = """
[access_levels.create_only]
allow = [{ methods = ["GET"], paths = ["/**"] }, { methods = ["POST"], paths = ["/api/posts"] }]
"""


@pytest.mark.parametrize("override", [True, False], ids=["body_method_override", "no body_method_override"])
async def test_a_post_with_a_body_needs_the_methods_its_body_could_name_unless_the_upstream_ignores_them(
    start_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path, override: bool
) -> None:
    """Rails, Laravel and Symfony run `POST` with `_method=DELETE` in its body as DELETE; the body is not read."""
    config = tmp_path / "levels.toml"
    config.write_text(CREATE_ONLY)
    gateway = await start_gateway(config_path=config, body_method_override=override)
    token = (await gateway.create_token(access_level="create_only"))["token"]
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    empty = await gateway.call(token, "/api/posts", method="POST", headers={"Content-Length": "0"})
    with_body = await gateway.call(token, "/api/posts", method="POST", data=b"_method=DELETE", headers=form)

    assert empty.status == 200
    if override:
        assert with_body.status == 403
        assert (await with_body.json())["code"] == "insufficient_access_level"
        assert "body" in (await with_body.json())["detail"]
        assert len(upstream.requests) == 1
    else:
        assert with_body.status == 200
        assert upstream.last["body"] == "_method=DELETE"


async def test_the_shipped_levels_allow_a_post_with_a_body_where_they_allow_post(
    gateway: Gateway, upstream: Upstream
) -> None:
    token = (await gateway.create_token(access_level="editorial"))["token"]
    response = await gateway.call(token, "/api/posts", method="POST", data=b'{"title": "x"}')
    assert response.status == 200
    assert upstream.last["body"] == '{"title": "x"}'


async def test_a_wsgi_upstream_reads_only_the_gateway_s_own_headers(start_gateway: GatewayFactory) -> None:
    """wsgiref, like CGI, gives `X_Gateway_Token_Id` and `X-Gateway-Token-Id` one environ key: a real WSGI
    server behind the gateway sees the values the gateway set, none a client forged."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        seen = {key: value for key, value in environ.items() if key.startswith("HTTP_")}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(seen).encode()]

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = make_server("127.0.0.1", 0, app, handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        gateway = await start_gateway(upstream=f"http://127.0.0.1:{server.server_port}")
        created = await gateway.create_token(access_level="editorial")
        forged = {
            "X_Gateway_Token_Id": "forged", "X_Gateway_Access_Level": "administrative",
            "X_Forwarded_For": "203.0.113.9", "X_HTTP_Method_Override": "DELETE", "X_Original_URL": "/admin",
        }
        response = await gateway.call(created["token"], headers=forged)
        assert response.status == 200
        environ = await response.json(content_type=None)
    finally:
        server.shutdown()
        server.server_close()
    assert environ["HTTP_X_GATEWAY_TOKEN_ID"] == created["id"]
    assert environ["HTTP_X_GATEWAY_ACCESS_LEVEL"] == "editorial"
    assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert "HTTP_X_HTTP_METHOD_OVERRIDE" not in environ and "HTTP_X_ORIGINAL_URL" not in environ


async def test_a_trusted_proxy_s_forwarded_proto_host_and_for_are_passed_on(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await start_gateway(trusted_proxies=["127.0.0.1/32"])
    token = (await gateway.create_token())["token"]
    response = await gateway.call(
        token,
        headers={
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "public.example",
            "X-Forwarded-For": "203.0.113.5, 10.0.0.2",
            "Host": "internal.example",
        },
    )
    assert response.status == 200
    pairs = [(name.lower(), value) for name, value in upstream.last["header_pairs"]]
    forwarding = [pair for pair in pairs if pair[0].startswith("x-forwarded-")]
    assert sorted(forwarding) == [
        ("x-forwarded-for", "10.0.0.2, 127.0.0.1"),
        ("x-forwarded-host", "public.example"),
        ("x-forwarded-proto", "https"),
    ]


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        # 10.0.0.2 is the first untrusted hop: what it claims to the left is its own writing.
        ("6.6.6.6, 203.0.113.5, 10.0.0.2", "10.0.0.2, 127.0.0.1"),
        # Trusted hops right of the client stay; the client's own claims left of it go.
        ("6.6.6.6, 203.0.113.5, 127.0.0.9", "203.0.113.5, 127.0.0.9, 127.0.0.1"),
        # Every hop trusted: the leftmost is the client, the whole chain was judged.
        ("127.0.0.7, 127.0.0.8", "127.0.0.7, 127.0.0.8, 127.0.0.1"),
        ("203.0.113.5:443, 127.0.0.9", "203.0.113.5:443, 127.0.0.9, 127.0.0.1"),
        # An unreadable hop leaves the client unknown: no hop of the chain is vouched for.
        ("203.0.113.5, garbage, 127.0.0.9", "127.0.0.1"),
    ],
)
async def test_the_upstream_gets_the_forwarded_for_chain_from_the_judged_client_on(
    start_gateway: GatewayFactory, upstream: Upstream, sent: str, forwarded: str
) -> None:
    """An upstream that reads the leftmost hop (Express req.ips[0], request-ip) must see the judged client."""
    gateway = await start_gateway(trusted_proxies=["127.0.0.0/8"])
    token = (await gateway.create_token(allowed_ip_ranges=[]))["token"]
    response = await gateway.call(token, headers={"X-Forwarded-For": sent})
    assert response.status == 200
    assert upstream.last["headers"]["X-Forwarded-For"] == forwarded


async def test_a_trusted_proxy_without_forwarded_proto_and_host_gets_the_gateway_s_own(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await start_gateway(trusted_proxies=["127.0.0.1/32"])
    token = (await gateway.create_token())["token"]
    response = await gateway.call(token, headers={"Host": "internal.example"})
    assert response.status == 200
    headers = upstream.last["headers"]
    assert (headers["X-Forwarded-Proto"], headers["X-Forwarded-Host"]) == ("http", "internal.example")
    assert headers["X-Forwarded-For"] == "127.0.0.1"


async def test_an_untrusted_peer_s_forwarded_proto_and_host_are_replaced(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await start_gateway(trusted_proxies=["10.0.0.0/8"])
    token = (await gateway.create_token())["token"]
    response = await gateway.call(
        token,
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "forged.example", "Host": "internal.example"},
    )
    assert response.status == 200
    pairs = [(name.lower(), value) for name, value in upstream.last["header_pairs"]]
    assert sorted(pair for pair in pairs if pair[0].startswith("x-forwarded-")) == [
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-host", "internal.example"),
        ("x-forwarded-proto", "http"),
    ]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_upstream_breaking_off_mid_response_cuts_the_client_connection(
    start_gateway: GatewayFactory, framing: str
) -> None:
    """Headers are already out: the client must see a broken body (a cut connection), never a short one
    that looks complete, and the gateway keeps serving."""
    answered: list[int] = []

    async def breaks_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        answered.append(len(head))
        if b"/whole" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwhole")
        elif framing == "content-length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(breaks_off, "127.0.0.1", 0)
    try:
        gateway = await start_gateway(upstream=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        token = (await gateway.create_token())["token"]
        request = f"GET /download HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy.server.port)
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            rest = await asyncio.wait_for(reader.read(), timeout=10)  # until the gateway cuts the connection
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.1 200 ")
        if framing == "content-length":
            assert b"Content-Length: 100000" in head and len(rest) < 100000
        else:
            assert b"Transfer-Encoding: chunked" in head and not rest.endswith(b"0\r\n\r\n")
        assert answered == [answered[0]]

        response = await gateway.call(token, "/whole")  # the gateway still serves
        assert (response.status, await response.read()) == (200, b"whole")
    finally:
        server.close()
        await server.wait_closed()


async def test_an_upstream_breaking_off_a_small_answer_gets_502(start_gateway: GatewayFactory) -> None:
    """A small answer is read whole before anything is sent, so its loss can still be a clean 502."""

    async def breaks_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(breaks_off, "127.0.0.1", 0)
    try:
        gateway = await start_gateway(upstream=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        token = (await gateway.create_token())["token"]
        response = await gateway.call(token)
        assert response.status == 502
        assert (await response.json())["code"] == "upstream_unavailable"
    finally:
        server.close()
        await server.wait_closed()
