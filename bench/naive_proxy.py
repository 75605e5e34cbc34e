"""The floor: the aiohttp reverse proxy anyone would write first, with a dict lookup for the token.

No argon2, no IP ranges, no access levels, no usage recording: one shared ClientSession, the bearer checked
against a dict, the method, path, headers and body forwarded, the response streamed back. The gateway does
strictly more work per request; the benchmark compares it with this, measured in the same run.

    .venv/bin/python bench/naive_proxy.py --port 8091 --upstream http://127.0.0.1:8090 [--token SECRET]
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

TOKENS = {"token": "bench"}  # bearer -> name; --token adds one
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
session_key = web.AppKey("session", aiohttp.ClientSession)
upstream_key = web.AppKey("upstream", str)


async def proxy(request: web.Request) -> web.StreamResponse:
    scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or bearer not in TOKENS:
        return web.json_response({"error": "invalid_token"}, status=401)
    headers = {
        name: value
        for name, value in request.headers.items()
        if name.lower() not in HOP_BY_HOP and name.lower() not in ("host", "authorization")
    }
    async with request.app[session_key].request(
        request.method,
        request.app[upstream_key] + request.raw_path,
        headers=headers,
        data=request.content if request.body_exists else None,
        allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(
            (name, value) for name, value in upstream.headers.items() if name.lower() not in HOP_BY_HOP
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(64 * 1024):
            await response.write(chunk)
        await response.write_eof()
        return response


def create_app(upstream: str) -> web.Application:
    async def session(app: web.Application) -> AsyncIterator[None]:
        app[session_key] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )
        yield
        await app[session_key].close()

    app = web.Application()
    app[upstream_key] = upstream.rstrip("/")
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{path:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--token", action="append", default=[], help="another accepted bearer token")
    arguments = parser.parse_args()
    TOKENS.update({token: "cli" for token in arguments.token})
    web.run_app(
        create_app(arguments.upstream), host="127.0.0.1", port=arguments.port, access_log=None, print=None
    )


if __name__ == "__main__":
    main()
