"""Real upstream routers for the differential test, each serving the routes of routes.json.

Every route answers 200 with the resource it serves (its template with the parameters it was given, as the
router decoded them) in `X-Route-Resource` (percent-encoded) and the method in `X-Route-Method`; anything else
is a 404 without them. The test then asks whether the token's level permits that method on that resource.

Werkzeug/Flask (on Werkzeug's server and under gunicorn), Starlette (under uvicorn), aiohttp and Express 4 (from
npm, see express/) run for real. Tomcat (with Spring MVC) and ASP.NET Core are emulations of their documented
path rules, on aiohttp's low-level server (which hands over the raw target):
- Tomcat/Spring: strip `;params` from every segment, then percent-decode (an encoded slash is a 400, as with
  Tomcat's default ALLOW_ENCODED_SLASH=false), then resolve dot segments (a `..` above the root is a 400);
  match case-sensitively, with or without a trailing slash (Spring's trailing-slash match, on before 6.0).
- ASP.NET Core: percent-decode everything but `%2F` (Kestrel keeps it), resolve dot segments, match literal
  segments with OrdinalIgnoreCase (compared upper-cased, as .NET's invariant upper-casing, which maps 'ſ' to
  'S' and 'ı' to 'I'), with or without a trailing slash.
- Rails: decode as ASP.NET does, match case-sensitively, and let the last segment carry a format suffix
  (`/api/users.json` is `/api/users`: `(.:format)` is on every route by default; `:id` stops at a '.').
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import flask
import uvicorn
import werkzeug.serving
from aiohttp import web
from aiohttp.test_utils import RawTestServer
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

HERE = Path(__file__).parent
ROUTES: list[str] = json.loads((HERE / "routes.json").read_text())
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
EXPRESS_DIR = HERE / "express"
_PARAMETER = re.compile(r"\{(\w+)\}")


def resource_of(template: str, params: dict[str, str]) -> str:
    return _PARAMETER.sub(lambda match: params[match.group(1)], template)


def route_headers(resource: str, method: str) -> dict[str, str]:
    return {"X-Route-Resource": quote(resource, safe=""), "X-Route-Method": method}


def flask_app() -> flask.Flask:
    app = flask.Flask("differential")

    def view(template: str) -> Callable[..., Any]:
        def handle(**params: str) -> flask.Response:
            resource = resource_of(template, params)
            response = flask.jsonify(router="werkzeug", resource=resource)
            response.headers.update(route_headers(resource, flask.request.method))
            return response

        return handle

    for index, template in enumerate(ROUTES):
        rule = _PARAMETER.sub(r"<\1>", template)
        app.add_url_rule(rule, f"route{index}", view(template), methods=METHODS, provide_automatic_options=False)
    return app


def starlette_app() -> Starlette:
    def endpoint(template: str) -> Callable[[StarletteRequest], Any]:
        async def handle(request: StarletteRequest) -> JSONResponse:
            resource = resource_of(template, dict(request.path_params))
            return JSONResponse(
                {"router": "starlette", "resource": resource}, headers=route_headers(resource, request.method)
            )

        return handle

    return Starlette(routes=[Route(template, endpoint(template), methods=METHODS) for template in ROUTES])


def aiohttp_app() -> web.Application:
    def handler(template: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            resource = resource_of(template, dict(request.match_info))
            return web.json_response(
                {"router": "aiohttp", "resource": resource}, headers=route_headers(resource, request.method)
            )

        return handle

    app = web.Application()
    for template in ROUTES:
        app.router.add_route("*", template, handler(template))
    return app


class _EmulatedRouter:
    """A router that reads the raw path by a framework's documented rules, then matches the templates."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._templates = [(template, template.strip("/").split("/")) for template in ROUTES]

    def segments(self, raw_path: str) -> list[str] | None:
        """The decoded segments this framework routes on, or None for its 400."""
        raw = raw_path.lstrip("/").split("/")
        if self.name == "tomcat":
            raw = [segment.partition(";")[0] for segment in raw]
            if any("%2f" in segment.lower() or "%5c" in segment.lower() for segment in raw):
                return None
            decoded = [unquote(segment) for segment in raw]
        else:
            decoded = ["%2F".join(unquote(piece) for piece in re.split("%2[fF]", segment)) for segment in raw]
        resolved: list[str] = []
        for segment in decoded:
            if segment == "..":
                if not resolved:
                    return None
                resolved.pop()
            elif segment not in (".", ""):
                resolved.append(segment)
        return resolved

    def same(self, literal: str, segment: str) -> bool:
        return literal == segment if self.name in ("tomcat", "rails") else literal.upper() == segment.upper()

    def route(self, raw_path: str) -> str | None | bool:
        """The resource served, None for a 404, False for a 400."""
        segments = self.segments(raw_path)
        if segments is None:
            return False
        if self.name == "rails" and segments:
            name, dot, format_ = segments[-1].partition(".")
            if dot and name and format_ and "." not in format_:
                segments[-1] = name  # `(.:format)`: every route also matches with a format suffix
        for template, parts in self._templates:
            if len(parts) != len(segments):
                continue
            params: dict[str, str] = {}
            for part, segment in zip(parts, segments):
                if part.startswith("{"):
                    params[part[1:-1]] = segment
                elif not self.same(part, segment):
                    break
            else:
                return resource_of(template, params)
        return None

    async def __call__(self, request: web.BaseRequest) -> web.Response:
        resource = self.route(request.raw_path.partition("?")[0])
        if resource is False:
            return web.json_response({"router": self.name, "resource": None}, status=400)
        if resource is None:
            return web.json_response({"router": self.name, "resource": None}, status=404)
        assert isinstance(resource, str)
        return web.json_response(
            {"router": self.name, "resource": resource}, headers=route_headers(resource, request.method)
        )


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class _QuietHandler(werkzeug.serving.WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


@asynccontextmanager
async def _werkzeug() -> AsyncIterator[str]:
    server = werkzeug.serving.make_server(
        "127.0.0.1", 0, flask_app(), threaded=True, request_handler=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="werkzeug-upstream", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        await asyncio.to_thread(server.shutdown)
        thread.join(timeout=10)
        server.server_close()


@asynccontextmanager
async def _gunicorn() -> AsyncIterator[str]:
    """Flask under gunicorn, which trusts forwarding headers (SCRIPT_NAME among them) from 127.0.0.1 by default."""
    sock = _free_socket()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gunicorn", "--bind", f"fd://{sock.fileno()}", "--workers", "1",
        "--threads", "8", "--log-level", "warning", "tests.routers.servers:flask_app()",
        pass_fds=[sock.fileno()], cwd=HERE.parents[1],
    )
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield url
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=10)
        sock.close()


@asynccontextmanager
async def _uvicorn() -> AsyncIterator[str]:
    sock = _free_socket()
    config = uvicorn.Config(
        starlette_app(), http="httptools", ws="none", lifespan="off", log_config=None, log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
        sock.close()


@asynccontextmanager
async def _aiohttp() -> AsyncIterator[str]:
    runner = web.AppRunner(aiohttp_app(), access_log=None)
    await runner.setup()
    site = web.SockSite(runner, _free_socket())
    await site.start()
    try:
        yield site.name.rstrip("/")
    finally:
        await runner.cleanup()


def express_available() -> str | None:
    """Why Express cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (EXPRESS_DIR / "node_modules" / "express").is_dir():
        return f"run `npm ci` in {EXPRESS_DIR} (scripts/test does)"
    return None


@asynccontextmanager
async def _express() -> AsyncIterator[str]:
    process = await asyncio.create_subprocess_exec(
        "node", str(EXPRESS_DIR / "app.js"), stdout=asyncio.subprocess.PIPE, env={**os.environ, "PORT": "0"}
    )
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(process.stdout.readline(), timeout=30))
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=10)


@asynccontextmanager
async def _emulated(name: str) -> AsyncIterator[str]:
    server = RawTestServer(_EmulatedRouter(name), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


ROUTERS: dict[str, Callable[[], Any]] = {
    "werkzeug": _werkzeug,
    "gunicorn": _gunicorn,
    "starlette": _uvicorn,
    "aiohttp": _aiohttp,
    "express": _express,
    "tomcat_emulated": lambda: _emulated("tomcat"),
    "aspnet_emulated": lambda: _emulated("aspnet"),
    "rails_emulated": lambda: _emulated("rails"),
}
