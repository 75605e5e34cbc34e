"""The proxy port's HTTP/1.1 server (gateway/http_server.py), seen from a client on a raw socket: framing,
keep-alive, pipelining, 100-continue, refusals of malformed or slow requests, and upgrades."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator

import pytest

from tests.conftest import Gateway, GatewayFactory, Upstream


class RawClient:
    """One TCP connection to the proxy port; reads responses by their framing, as a strict client would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout=10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if head_only or status < 200 or status in (204, 304):
            return status, headers, b""
        if "content-length" in headers:
            body = await asyncio.wait_for(self.reader.readexactly(int(headers["content-length"])), timeout=10)
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await asyncio.wait_for(self.reader.read(), timeout=10)  # until the server closes
        return status, headers, body

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), timeout=10) == b""


@pytest.fixture
async def connect(gateway: Gateway) -> AsyncIterator[object]:
    clients: list[RawClient] = []

    async def open_client(target: Gateway = gateway) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", target.proxy.server.port)
        clients.append(RawClient(reader, writer))
        return clients[-1]

    yield open_client
    for client in clients:
        client.writer.close()


def _get(path: str, token: str, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: api\r\nAuthorization: Bearer {token}\r\n{extra}\r\n".encode()


async def test_pipelined_requests_are_answered_in_order(gateway: Gateway, connect: object) -> None:
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    body = b"x" * 10
    await client.send(
        _get("/first", token)
        + f"POST /second HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\nContent-Length: 10\r\n\r\n".encode()
        + body
        + _get("/third", "wrong")
        + _get("/fourth", token)
    )
    answers = [await client.response() for _ in range(4)]
    assert [status for status, _, _ in answers] == [200, 200, 401, 200]
    assert json.loads(answers[0][2])["raw_path"] == "/first"
    assert json.loads(answers[1][2])["body"] == "x" * 10
    assert json.loads(answers[2][2])["code"] == "invalid_token"
    assert json.loads(answers[3][2])["raw_path"] == "/fourth"


async def test_a_connection_repeating_a_request_is_judged_again_after_each_token_change(
    gateway: Gateway, connect: object
) -> None:
    """The handler remembers its last decision per connection; a token change must end it at once."""
    created = await gateway.create_token(access_level="administrative")
    client = await connect()  # type: ignore[operator]

    async def ask(method: str = "GET", path: str = "/api/posts") -> tuple[int, str]:
        await client.send(
            f"{method} {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {created['token']}\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )
        status, _, body = await client.response()
        return status, json.loads(body).get("code", "") if status != 200 else ""

    async def edit(**fields: object) -> None:
        status, _ = await gateway.admin_call("PATCH", f"/v1/tokens/{created['id']}", json=fields)
        assert status == 200

    assert await ask() == (200, "")
    assert await ask("POST") == (200, "")
    await edit(access_level="read_only")
    assert await ask("POST") == (403, "insufficient_access_level")
    assert await ask() == (200, "")
    await edit(allowed_ip_ranges=["10.0.0.0/8"])
    assert await ask() == (403, "ip_not_allowed")
    await edit(allowed_ip_ranges=["127.0.0.0/8"])
    assert await ask() == (200, "")
    status, _ = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/disable")
    assert status == 200
    assert await ask() == (401, "token_disabled")
    status, _ = await gateway.admin_call("POST", f"/v1/tokens/{created['id']}/enable")
    assert status == 200
    assert await ask() == (200, "")
    status, _ = await gateway.admin_call("DELETE", f"/v1/tokens/{created['id']}")
    assert status == 204
    assert await ask() == (401, "invalid_token")


async def test_a_connection_alternating_allowed_and_refused_requests_gets_each_its_own_answer(
    gateway: Gateway, connect: object
) -> None:
    """The remembered decision holds for one method and target only: a request that differs in either,
    even by a query string or a dot segment, is judged afresh."""
    token = (await gateway.create_token(access_level="restricted_read_only"))["token"]
    client = await connect()  # type: ignore[operator]

    async def ask(method: str, target: str) -> tuple[int, str]:
        await client.send(
            f"{method} {target} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        status, _, body = await client.response(head_only=method == "HEAD")
        return status, json.loads(body).get("code", "") if status >= 400 and body else ""

    allowed, refused = (200, ""), (403, "insufficient_access_level")
    assert await ask("GET", "/api/news/1") == allowed
    assert await ask("GET", "/api/users") == refused
    assert await ask("GET", "/api/news/1") == allowed
    assert await ask("GET", "/api/news/1?page=2") == allowed
    assert await ask("GET", "/api/news/../users") == refused
    assert await ask("GET", "/api/news/%2e%2e/users") == refused
    assert await ask("GET", "/api/news/1") == allowed
    assert await ask("POST", "/api/news/1") == refused
    assert await ask("HEAD", "/api/news/1") == allowed
    assert await ask("OPTIONS", "/api/news/1") == refused
    assert await ask("GET", "/api/news/1") == allowed


async def test_http_1_0_closes_unless_asked_to_keep_alive(gateway: Gateway, connect: object) -> None:
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    await client.send(_get("/a", token, "Connection: keep-alive\r\n", version="1.0"))
    status, headers, _ = await client.response()
    assert status == 200 and headers["connection"] == "keep-alive"
    await client.send(_get("/b", token, version="1.0"))
    status, headers, _ = await client.response()
    assert status == 200 and headers["connection"] == "close"
    assert await client.closed_by_server()


async def test_a_body_of_unknown_length_is_chunked_for_1_1_and_close_delimited_for_1_0(
    gateway: Gateway, connect: object
) -> None:
    token = (await gateway.create_token())["token"]
    expected = (bytes(range(256)) * 256 * 4)[:200_000]
    client = await connect()  # type: ignore[operator]
    await client.send(_get("/download?bytes=200000&chunked=1", token))
    status, headers, body = await client.response()
    assert status == 200 and headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    assert body == expected
    await client.send(_get("/api/posts", token))  # the connection is still usable
    assert (await client.response())[0] == 200

    old = await connect()  # type: ignore[operator]
    await old.send(_get("/download?bytes=200000&chunked=1", token, version="1.0"))
    status, headers, body = await old.response()
    assert status == 200 and "transfer-encoding" not in headers and "content-length" not in headers
    assert body == expected


async def test_head_keeps_the_connection_in_step(gateway: Gateway, connect: object) -> None:
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    await client.send(
        _get("/download?bytes=1000", token).replace(b"GET", b"HEAD", 1) + _get("/after-head", token)
    )
    status, headers, _ = await client.response(head_only=True)
    assert status == 200 and headers["content-length"] == "1000"
    status, _, body = await client.response()
    assert status == 200 and json.loads(body)["raw_path"] == "/after-head"


async def test_expect_100_continue_is_answered_only_for_an_accepted_request(
    gateway: Gateway, connect: object, upstream: Upstream
) -> None:
    token = (await gateway.create_token())["token"]
    body = b"payload" * 1000
    head = "POST /sha256 HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n"

    client = await connect()  # type: ignore[operator]
    await client.send(head.format(token, len(body)).encode())
    interim, _, _ = await client.response()
    assert interim == 100
    await client.send(body)
    status, _, answer = await client.response()
    assert status == 200 and json.loads(answer) == {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
    assert "expect" not in {name.lower() for name in upstream.last["headers"]}

    refused = await connect()  # type: ignore[operator]
    await refused.send(head.format("not-a-token", len(body)).encode())
    status, headers, answer = await refused.response()
    assert status == 401 and json.loads(answer)["code"] == "invalid_token"
    assert headers["connection"] == "close"  # the body it did not send cannot be told from a next request
    assert await refused.closed_by_server()


async def test_malformed_request_gets_400_problem_and_close(gateway: Gateway, connect: object) -> None:
    client = await connect()  # type: ignore[operator]
    await client.send(b"GET / HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
    status, headers, body = await client.response()
    assert status == 400 and headers["content-type"] == "application/problem+json"
    assert json.loads(body)["code"] == "bad_request"
    assert await client.closed_by_server()


async def test_a_request_head_that_never_ends_gets_408(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(client_header_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy.server.port)
    writer.write(b"GET /api/posts HTTP/1.1\r\nHost: api\r\nX-Slow: ")
    reply = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 408 ") and b'"code": "client_timeout"' in reply


async def test_idle_keep_alive_connections_are_closed(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(keepalive_timeout=0.2)
    token = (await gateway.create_token())["token"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy.server.port)
    client = RawClient(reader, writer)
    await client.send(_get("/api/posts", token))
    assert (await client.response())[0] == 200
    assert await client.closed_by_server()
    writer.close()


async def test_upgrades_other_than_websocket_are_answered_as_plain_http_then_closed(
    gateway: Gateway, connect: object, upstream: Upstream
) -> None:
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    await client.send(_get("/socket", token, "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n") + b"PRI *")
    status, headers, _ = await client.response()
    assert status == 200 and headers["connection"] == "close"
    assert "upgrade" not in {name.lower() for name in upstream.last["headers"]}
    assert await client.closed_by_server()


async def test_a_websocket_upgrade_the_upstream_does_not_take_gets_its_answer_then_closes(
    gateway: Gateway, connect: object, upstream: Upstream
) -> None:
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    await client.send(_get("/socket", token, "Connection: Upgrade\r\nUpgrade: websocket\r\n"))
    status, headers, body = await client.response()
    assert status == 200 and headers["connection"] == "close"
    assert json.loads(body)["raw_path"] == "/socket"
    assert upstream.last["headers"]["Upgrade"] == "websocket"
    assert "Authorization" not in upstream.last["headers"]
    assert await client.closed_by_server()


async def test_a_websocket_upgrade_with_a_body_is_refused(gateway: Gateway, connect: object) -> None:
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    await client.send(_get("/socket", token, "Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 3\r\n") + b"abc")
    status, _, body = await client.response()
    assert status == 400 and json.loads(body)["code"] == "bad_request"
    assert await client.closed_by_server()


async def test_a_request_target_that_is_not_a_path_is_refused(gateway: Gateway, connect: object) -> None:
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    await client.send(
        f"OPTIONS * HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        + _get("/still-served", token)
    )
    status, _, body = await client.response()
    assert status == 400 and json.loads(body)["code"] == "invalid_request_target"
    assert (await client.response())[0] == 200


async def test_responses_carry_a_date_and_no_server_banner(gateway: Gateway, connect: object) -> None:
    client = await connect()  # type: ignore[operator]
    await client.send(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
    status, headers, _ = await client.response()
    assert status == 401 and headers["date"].endswith(" GMT") and "server" not in headers


async def test_repeated_headers_on_a_connection_never_outlive_a_revocation(gateway: Gateway, connect: object) -> None:
    created = await gateway.create_token()
    token, token_id = created["token"], created["id"]
    client = await connect()  # type: ignore[operator]
    request = _get("/api/posts", token)
    await client.send(request)
    assert (await client.response())[0] == 200

    assert (await gateway.admin_call("POST", f"/v1/tokens/{token_id}/disable"))[0] == 200
    await client.send(request)  # byte for byte the same request, on the same connection
    status, _, body = await client.response()
    assert status == 401 and json.loads(body)["code"] == "token_disabled"

    assert (await gateway.admin_call("POST", f"/v1/tokens/{token_id}/enable"))[0] == 200
    await client.send(request)
    assert (await client.response())[0] == 200
    status, rotated = await gateway.admin_call("POST", f"/v1/tokens/{token_id}/rotate", json={"grace_seconds": 0})
    assert status == 200
    await client.send(request)
    status, _, body = await client.response()
    assert status == 401 and json.loads(body)["code"] == "invalid_token"
    await client.send(_get("/api/posts", rotated["token"]))
    assert (await client.response())[0] == 200


def _post(path: str, token: str, framing: str, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n{framing}{extra}\r\n".encode()


async def test_trailers_never_become_request_headers(
    start_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await start_gateway(trusted_proxies=["127.0.0.1/32"])
    token = (await gateway.create_token(allowed_ip_ranges=["10.9.9.0/24"]))["token"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy.server.port)
    client = RawClient(reader, writer)
    # Head, body and trailers in one write, so they are all parsed before the handler runs.
    await client.send(
        _post("/echo", token, "Transfer-Encoding: chunked\r\n", "X-Forwarded-For: 203.0.113.7\r\n")
        + b"5\r\nhello\r\n0\r\nX-Forwarded-For: 10.9.9.9\r\nX-Injected: from-trailer\r\n\r\n"
    )
    status, _, body = await client.response()
    writer.close()
    assert status == 403 and json.loads(body)["code"] == "ip_not_allowed"

    open_token = (await gateway.create_token())["token"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy.server.port)
    client = RawClient(reader, writer)
    await client.send(
        _post("/echo", open_token, "Transfer-Encoding: chunked\r\n")
        + b"5\r\nhello\r\n0\r\nX-Injected: from-trailer\r\n\r\n"
    )
    status, _, body = await client.response()
    writer.close()
    assert status == 200 and json.loads(body)["body"] == "hello"
    assert "x-injected" not in {name.lower() for name in upstream.last["headers"]}


async def test_a_body_cut_short_gets_400_not_silence(gateway: Gateway, connect: object) -> None:
    token = (await gateway.create_token())["token"]
    half_closed = await connect()  # type: ignore[operator]
    await half_closed.send(_post("/sha256", token, "Content-Length: 100\r\n") + b"x" * 10)
    half_closed.writer.write_eof()
    status, _, body = await half_closed.response()
    assert status == 400 and json.loads(body)["code"] == "incomplete_body"

    broken = await connect()  # type: ignore[operator]
    await broken.send(_post("/sha256", token, "Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n")
    await asyncio.sleep(0.05)  # the handler is streaming the body when the broken chunk arrives
    await broken.send(b"zz\r\n")
    status, headers, body = await broken.response()
    assert status == 400 and json.loads(body)["code"] == "bad_request" and headers["connection"] == "close"


async def test_a_refused_large_body_leaves_the_connection_usable(gateway: Gateway, connect: object) -> None:
    fenced = (await gateway.create_token(allowed_ip_ranges=["10.0.0.0/8"]))["token"]
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    await client.send(_post("/sha256", fenced, "Content-Length: 307200\r\n") + b"x" * 307200)
    status, _, body = await client.response()
    assert status == 403 and json.loads(body)["code"] == "ip_not_allowed"
    await client.send(_get("/after", token))
    assert (await client.response())[0] == 200


async def test_a_client_pipelining_without_reading_is_not_buffered_for(gateway: Gateway, connect: object) -> None:
    client = await connect()  # type: ignore[operator]
    flood = b"GET / HTTP/1.1\r\nHost: api\r\n\r\n" * 100_000  # 3 MB of requests, 30+ MB of answers
    client.writer.write(flood)
    await asyncio.sleep(0.5)
    (connection,) = gateway.proxy.server.runner.server.connections  # type: ignore[union-attr]
    assert connection._transport.get_write_buffer_size() < 4 * 1024 * 1024
    answered = 0
    for _ in range(100_000):
        status, _, _ = await client.response()
        assert status == 401
        answered += 1
    assert answered == 100_000


async def test_the_header_timeout_also_covers_a_head_behind_an_answer(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(client_header_timeout=0.2, keepalive_timeout=60)
    token = (await gateway.create_token())["token"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy.server.port)
    client = RawClient(reader, writer)
    await client.send(_get("/first", token) + b"GET /second HT")
    assert (await client.response())[0] == 200
    status, _, body = await client.response()
    writer.close()
    assert status == 408 and json.loads(body)["code"] == "client_timeout"


async def test_transfer_codings_other_than_chunked_get_501(gateway: Gateway, connect: object) -> None:
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    await client.send(_post("/sha256", token, "Transfer-Encoding: gzip, chunked\r\n") + b"0\r\n\r\n")
    status, _, body = await client.response()
    assert status == 501 and json.loads(body)["code"] == "unsupported_transfer_coding"


@pytest.mark.parametrize(
    ("head", "detail"),
    [
        ("GET /api/posts HTTP/1.1\r\n", "The request has no Host header."),
        ("GET /api/posts HTTP/1.1\r\nHost: api\r\nHost: evil.example\r\n", "The request has more than one Host header."),
        ("GET /api/posts HTTP/1.0\r\nHost: api\r\nhost: api\r\n", "The request has more than one Host header."),
    ],
    ids=["no Host", "two Host headers", "two Host headers in HTTP/1.0"],
)
async def test_a_request_without_exactly_one_host_gets_400(
    gateway: Gateway, upstream: Upstream, connect: object, head: str, detail: str
) -> None:
    """RFC 9112 3.2; the request is answered on its own and the connection stays usable."""
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    await client.send(f"{head}Authorization: Bearer {token}\r\nConnection: keep-alive\r\n\r\n".encode() + _get("/next", token))
    status, headers, body = await client.response()
    assert status == 400 and headers["content-type"] == "application/problem+json"
    assert (json.loads(body)["code"], json.loads(body)["detail"]) == ("bad_request", detail)
    status, _, body = await client.response()
    assert status == 200 and [seen["raw_path"] for seen in upstream.requests] == ["/next"]


async def test_http_1_0_without_host_is_forwarded_with_the_upstream_host(
    gateway: Gateway, upstream: Upstream, connect: object
) -> None:
    """RFC 9112 lets an HTTP/1.0 client omit Host; the upstream gets the gateway's Host either way."""
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    await client.send(f"GET /old HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    status, _, _ = await client.response()
    assert status == 200
    assert upstream.last["headers"]["Host"] == upstream.url.removeprefix("http://")
    assert "X-Forwarded-Host" not in upstream.last["headers"]


async def test_pipelined_requests_then_a_half_close_are_all_answered_in_order(
    gateway: Gateway, connect: object
) -> None:
    """A client may send its requests, shut its sending side and read: every complete request is answered,
    only the last answer says the connection closes, and then it does."""
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    await client.send(
        _get("/first", token)
        + f"POST /second HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\nContent-Length: 3\r\n\r\nabc".encode()
        + _get("/third", "wrong")
        + _get("/fourth", token)
    )
    client.writer.write_eof()
    answers = [await client.response() for _ in range(4)]
    assert [status for status, _, _ in answers] == [200, 200, 401, 200]
    assert [json.loads(body).get("raw_path") for _, _, body in answers] == ["/first", "/second", None, "/fourth"]
    assert [headers.get("connection") for _, headers, _ in answers] == [None, None, None, "close"]
    assert await client.closed_by_server()


async def test_a_half_close_inside_a_pipelined_body_answers_the_complete_requests_first(
    gateway: Gateway, connect: object
) -> None:
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    await client.send(
        _get("/first", token)
        + f"POST /cut HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\nContent-Length: 10\r\n\r\nabc".encode()
    )
    client.writer.write_eof()
    status, _, body = await client.response()
    assert status == 200 and json.loads(body)["raw_path"] == "/first"
    status, headers, body = await client.response()
    assert status == 400 and json.loads(body)["code"] == "incomplete_body"
    assert headers["connection"] == "close"
    assert await client.closed_by_server()


async def test_a_decision_allowed_for_one_method_is_not_reused_for_another_on_the_same_target(
    gateway: Gateway, connect: object, upstream: Upstream
) -> None:
    """managing_editorial may GET /api/spaces/3 but not change it: each method on the target is judged."""
    token = (await gateway.create_token(access_level="managing_editorial"))["token"]
    client = await connect()  # type: ignore[operator]

    async def ask(method: str) -> tuple[int, str]:
        await client.send(
            f"{method} /api/spaces/3 HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )
        status, _, body = await client.response(head_only=method == "HEAD")
        return status, json.loads(body).get("code", "") if status >= 400 and body else ""

    seen = len(upstream.requests)
    answers = []
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        answers.append((method, await ask("GET"), await ask(method)))
    assert answers == [
        (method, (200, ""), (403, "insufficient_access_level")) for method in ("POST", "PUT", "PATCH", "DELETE")
    ]
    assert [request["method"] for request in upstream.requests[seen:]] == ["GET"] * 4


async def test_each_method_reaches_the_upstream_as_sent_on_a_reused_connection(
    gateway: Gateway, connect: object, upstream: Upstream
) -> None:
    token = (await gateway.create_token(access_level="read_only"))["token"]
    client = await connect()  # type: ignore[operator]
    seen = len(upstream.requests)
    statuses = []
    for method in ("GET", "HEAD", "OPTIONS", "GET", "POST", "DELETE", "HEAD"):
        await client.send(f"{method} /api/posts/1 HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        statuses.append((await client.response(head_only=method == "HEAD"))[0])

    assert statuses == [200, 200, 200, 200, 403, 403, 200]
    assert [request["method"] for request in upstream.requests[seen:]] == ["GET", "HEAD", "OPTIONS", "GET", "HEAD"]


@pytest.mark.parametrize("shape", ["one large field", "many fields"])
async def test_oversized_request_trailers_are_refused_with_431_and_close(
    gateway: Gateway, connect: object, upstream: Upstream, shape: str
) -> None:
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    if shape == "one large field":
        trailers = b"X-Big: " + b"a" * 9000 + b"\r\n"
    else:
        trailers = b"".join(b"X-T-%d: %s\r\n" % (index, b"v" * 100) for index in range(100))
    # The body is held back by its missing last chunk, so the trailers arrive while it is being streamed.
    await client.send(_post("/sha256", token, "Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n")
    await client.send(b"0\r\n" + trailers + b"\r\n")

    status, headers, body = await client.response()

    assert status == 431 and headers["connection"] == "close"
    assert json.loads(body)["code"] == "headers_too_large"
    assert "trailer" in json.loads(body)["detail"]
    assert await client.closed_by_server()


async def test_request_trailers_just_under_the_limit_are_accepted(
    gateway: Gateway, connect: object, upstream: Upstream
) -> None:
    token = (await gateway.create_token())["token"]
    client = await connect()  # type: ignore[operator]
    field = b"X-Big: " + b"a" * (8190 - len(b"X-Big") - 4) + b"\r\n"  # name, value, ": " and CRLF: 8190 bytes

    await client.send(_post("/sha256", token, "Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n0\r\n" + field + b"\r\n")
    status, _, body = await client.response()

    assert status == 200 and json.loads(body) == {"sha256": hashlib.sha256(b"hello").hexdigest(), "size": 5}


async def test_a_connection_varying_only_the_query_gets_each_query_judged_and_forwarded_as_sent(
    gateway: Gateway, connect: object, upstream: Upstream
) -> None:
    """The remembered decision is reused for the same path with another query string, but the query is still
    read every time: a method override in it is refused, and each one reaches the upstream exactly."""
    token = (await gateway.create_token(access_level="read_only"))["token"]
    client = await connect()  # type: ignore[operator]

    async def ask(target: str) -> tuple[int, str]:
        await client.send(_get(target, token))
        status, _, body = await client.response()
        return status, json.loads(body).get("code", "") if status >= 400 else json.loads(body)["raw_path"]

    assert await ask("/api/posts?page=1") == (200, "/api/posts?page=1")
    assert await ask("/api/posts?page=2") == (200, "/api/posts?page=2")
    assert await ask("/api/posts?_method=DELETE") == (400, "method_override")
    assert await ask("/api/posts?x=%5F%6Dethod") == (200, "/api/posts?x=%5F%6Dethod")
    assert await ask("/api/posts?%5F%6Dethod=PUT") == (400, "method_override")
    assert await ask("/api/posts") == (200, "/api/posts")
    assert await ask("/api/./posts?page=3") == (200, "/api/posts?page=3")


async def test_the_health_path_is_answered_on_a_connection_that_was_just_forwarding(
    gateway: Gateway, connect: object, upstream: Upstream
) -> None:
    token = (await gateway.create_token(access_level="read_only"))["token"]
    client = await connect()  # type: ignore[operator]
    for target in ("/api/posts", "/.gateway/health", "/api/posts", "/api/../%2Egateway/health"):
        await client.send(_get(target, token))
        status, headers, body = await client.response()
        assert status == 200, (target, body)
        assert ("status" in json.loads(body)) == target.endswith("health"), target
    assert [request["raw_path"] for request in upstream.requests[-2:]] == ["/api/posts", "/api/posts"]
