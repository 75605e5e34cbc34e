"""The API Access page: its files, served from the package, and the list of access levels its form offers.

The page holds no data of its own. It signs in with an admin key kept in the browser tab and calls the same
JSON routes as curl does, so its files are public (see `is_public` in admin_auth) while every /v1 route here
still needs an admin key. The files are read once and served by name from that set: a request path never
reaches the file system, so there is nothing to traverse.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType

from aiohttp import hdrs, web

from admin_api.validation import query_parameters
from gateway.core import core_key

PAGE_PACKAGE = "admin_api"
PAGE_FOLDER = "page"
INDEX = "index.html"
CONTENT_TYPES = MappingProxyType(
    {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
)
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
PAGE_HEADERS = MappingProxyType(
    {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        # Revalidate every time (cheap, with the ETag): an upgraded gateway must never run yesterday's script.
        "Cache-Control": "no-cache",
    }
)

routes = web.RouteTableDef()


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


@functools.cache
def page_assets() -> MappingProxyType[str, Asset]:
    """Every servable file of the page, by name; files of other types in the folder are never served."""
    folder = resources.files(PAGE_PACKAGE) / PAGE_FOLDER
    assets: dict[str, Asset] = {}
    for entry in folder.iterdir():
        suffix = entry.name[entry.name.rfind(".") :] if "." in entry.name else ""
        if entry.is_file() and suffix in CONTENT_TYPES:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            assets[entry.name] = Asset(body, CONTENT_TYPES[suffix], etag)
    return MappingProxyType(assets)


def _serve(request: web.Request, name: str) -> web.Response:
    asset = page_assets().get(name)
    if asset is None:
        raise web.HTTPNotFound()
    headers = {**PAGE_HEADERS, hdrs.ETAG: asset.etag}
    if request.headers.get(hdrs.IF_NONE_MATCH) == asset.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers)


@routes.get("/")
async def page(request: web.Request) -> web.Response:
    return _serve(request, INDEX)


@routes.get("/page/{asset}")
async def page_asset(request: web.Request) -> web.Response:
    return _serve(request, request.match_info["asset"])


@routes.get("/v1/access-levels")
async def list_access_levels(request: web.Request) -> web.Response:
    """The configured levels, in configuration order, for the page's select: name and description only."""
    query_parameters(request, ())
    levels = request.app[core_key].settings.access_levels
    return web.json_response(
        {"items": [{"name": level.name, "description": level.description} for level in levels.values()]}
    )
