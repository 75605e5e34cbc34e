"""A tiny upstream for trying the gateway out: it answers every request with what it received."""

from __future__ import annotations

from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "service": "demo upstream",
            "method": request.method,
            "path": request.raw_path,
            "token_id": request.headers.get("X-Gateway-Token-Id"),
            "access_level": request.headers.get("X-Gateway-Access-Level"),
            "forwarded_for": request.headers.get("X-Forwarded-For"),
            "body_bytes": len(body),
        }
    )


def create_demo_upstream_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", echo)
    return app
