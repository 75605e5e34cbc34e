"""/metrics on an address of its own (`metrics_listen`), for scrapers that should not reach the admin API.

`gateway proxy --workers N` runs N processes, each with its own numbers: worker k serves them on the
configured port + k, so a scraper lists N targets and sums them (Prometheus adds an `instance` label to
each). Reading needs an admin key unless `metrics_public`; the key check is handed in by the composition
root, since the data plane does not know the admin API.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from gateway.client_ip import parse_address
from gateway.core import Core, core_key
from gateway.failure_limits import source_key
from gateway.metrics.exposition import CONTENT_TYPE, render
from gateway.problems import problem_middleware

# (the Authorization header, the caller's address key for limiting wrong keys: failure_limits.source_key)
Authenticate = Callable[[str | None, str], Awaitable[object]]
authenticate_key: web.AppKey[Authenticate | None] = web.AppKey("metrics_authenticate")


async def metrics_response(core: Core) -> web.Response:
    response = web.Response(body=(await render(core)).encode())
    response.headers[hdrs.CONTENT_TYPE] = CONTENT_TYPE
    response.headers[hdrs.CACHE_CONTROL] = "no-store"
    return response


async def _metrics(request: web.Request) -> web.Response:
    authenticate = request.app[authenticate_key]
    if authenticate is not None:
        source = source_key(parse_address(request.remote)) if request.remote is not None else "unknown"
        await authenticate(request.headers.get(hdrs.AUTHORIZATION), source)
    return await metrics_response(request.app[core_key])


def create_metrics_app(core: Core, authenticate: Authenticate | None) -> web.Application:
    """`authenticate` raises a GatewayError (401) for a request without a valid admin key; None when the
    metrics are public."""
    app = web.Application(middlewares=[problem_middleware])
    app[core_key] = core
    app[authenticate_key] = authenticate
    app.router.add_get("/metrics", _metrics)
    return app
