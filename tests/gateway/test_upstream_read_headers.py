"""Headers that an upstream server reads as part of the request's target never come from a client.

A WSGI server can take the application's mount point from a request header: gunicorn reads `SCRIPT_NAME` (and
trusts it from 127.0.0.1 by default, where a gateway beside it connects from) and routes only what follows it.
The gateway judges the whole path, so such a header would let the upstream route a part of it that was never
judged: `GET /api/public/api/users` with `SCRIPT_NAME: /api/public` ran Flask's /api/users handler.
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

from tests.conftest import GatewayFactory
from tests.routers.servers import ROUTERS

# Header lines a client adds so that a WSGI or CGI server routes less of the path than the gateway judged.
MOUNT_POINT_HEADERS = [
    b"SCRIPT_NAME: /api/public",
    b"Script-Name: /api/public",
    b"script_name: /api/public",
    b"PATH_INFO: /api/users",
    b"Path-Info: /api/users",
    b"X-Script-Name: /api/public",
    b"X-Forwarded-Prefix: /api/public",
]


async def _send(port: int, head: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        reply = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    return int(reply.split(b" ", 2)[1]), reply


async def test_a_client_cannot_move_a_wsgi_servers_mount_point(start_gateway: GatewayFactory) -> None:
    async with ROUTERS["gunicorn"]() as upstream_url:
        gateway = await start_gateway(planes=("proxy", "admin"), upstream=upstream_url)
        token = (await gateway.create_token(access_level="restricted_read_only"))["token"]
        port = gateway.proxy.server.port
        assert port is not None

        def request(header: bytes) -> bytes:
            return (
                b"GET /api/public/api/users HTTP/1.1\r\nHost: gateway.test\r\nAuthorization: Bearer "
                + token.encode() + b"\r\n" + header + b"\r\nConnection: close\r\n\r\n"
            )

        served = {}
        for header in MOUNT_POINT_HEADERS:
            status, reply = await _send(port, request(header))
            served[header] = (status, [
                unquote(line.partition(b":")[2].strip().decode())
                for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n")
                if line.lower().startswith(b"x-route-resource:")
            ])
    # The level allows /api/public/**: the upstream routes the whole path that was judged (the public resource
    # `api/users`), never the users list after a mount point the client chose.
    assert served == {header: (200, ["/api/public/api/users"]) for header in MOUNT_POINT_HEADERS}
