"""The command line and composition root: the only module that knows both planes.

    gateway serve                    proxy and admin API in one process (the embedded default)
    gateway proxy [--workers N]      the data plane only; N processes share the port (SO_REUSEPORT)
    gateway admin                    the control plane only
    gateway migrate                  create or upgrade the store's schema, then exit
    gateway tokens ... / admin-keys ...  the admin API from a shell (admin_cli/: a client over HTTP)

`--forward-auth-listen HOST:PORT` (serve, proxy) also answers forward-auth requests on that address, from the
same data plane; without an upstream, `gateway proxy` serves forward-auth alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import ssl
import sys
import tomllib
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import admin_cli.commands
from gateway import __version__
from gateway.log_format import configure_logging
from gateway.settings import (
    DEFAULT_CONFIG_PATH,
    ListenAddress,
    Settings,
    SettingsError,
    env_name,
    load_settings,
    parse_listen_address,
)
from gateway.store import SchemaError, SchemaOutdated, StoreUnavailable
from gateway.tls import ServerTls

# The planes (uvloop, Redis, the core, both apps) are imported where they start, not here: an admin command
# (`gateway tokens list`) then starts in a fraction of the time. tests/admin_cli checks that it stays so.
if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("gateway")

FLAG_SETTINGS = (
    "upstream", "proxy_listen", "admin_listen", "database_url", "redis_url", "trusted_proxies", "log_level"
)
FLAG_HELP = {
    "upstream": "URL of the API the gateway protects (required for the proxy)",
    "proxy_listen": "HOST:PORT the proxy listens on",
    "admin_listen": "HOST:PORT the admin API listens on (keep it on loopback or a private network)",
    "database_url": "the store: sqlite:///PATH, or postgresql://USER@HOST:PORT/DATABASE for many hosts",
    "redis_url": "Redis shared by every gateway process: redis://, rediss://, unix:// or"
    " redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] or redis+cluster://HOST:PORT[,HOST:PORT...] URL",
    "trusted_proxies": "comma-separated addresses/CIDRs whose X-Forwarded-For is believed",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "forward_auth_listen": "also answer forward-auth requests (nginx auth_request and the like) on this HOST:PORT",
}
PLANES = {"serve": ("proxy", "admin"), "proxy": ("proxy",), "admin": ("admin",), "migrate": ()}


def _setting_help(name: str, defaults: dict[str, Any]) -> str:
    """A flag's help: what it sets, its environment variable, and the packaged default."""
    default = defaults.get(name)
    shown = "" if default in (None, "", []) else f", default {default}"
    return f"{FLAG_HELP[name]} ({env_name(name)}{shown})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="API-token authentication gateway. Settings come from the config file, then GATEWAY_*"
        " environment variables, then these flags; config/gateway.toml documents every one.",
    )
    with DEFAULT_CONFIG_PATH.open("rb") as file:
        defaults = tomllib.load(file)
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    helps = {
        "serve": "run the proxy and the admin API in one process",
        "proxy": "run the proxy only (with PostgreSQL or GATEWAY_REDIS_URL, beside a separate admin process)",
        "admin": "run the admin API only (with PostgreSQL or GATEWAY_REDIS_URL, beside separate proxy processes)",
        "migrate": "create or upgrade the store's schema to this version's, then exit",
    }
    for command, text in helps.items():
        sub = commands.add_parser(command, help=text, description=text)
        sub.add_argument(
            "--config", help="TOML config file (GATEWAY_CONFIG; default: the built-in config/gateway.toml)"
        )
        for name in FLAG_SETTINGS:
            sub.add_argument(
                "--" + name.replace("_", "-"), dest=name, metavar=name.upper(), help=_setting_help(name, defaults)
            )
        if command == "serve":
            sub.add_argument(
                "--demo-upstream",
                metavar="HOST:PORT",
                nargs="?",
                const="127.0.0.1:8090",
                help="also run a demo upstream that echoes requests (default 127.0.0.1:8090) and use it as the"
                " upstream (no environment variable: for trying the gateway out)",
            )
        if command in ("serve", "proxy"):
            sub.add_argument(
                "--forward-auth-listen",
                dest="forward_auth_listen",
                metavar="HOST:PORT",
                help=_setting_help("forward_auth_listen", defaults),
            )
        if command == "proxy":
            sub.add_argument(
                "--workers",
                type=int,
                default=1,
                help="proxy processes sharing the port with SO_REUSEPORT, 1-64 (no environment variable; default 1)",
            )
        if command != "migrate":
            sub.add_argument(
                "--migrate",
                action="store_true",
                help="upgrade an older PostgreSQL schema on start instead of refusing to start",
            )
    admin_cli.commands.add_commands(commands)
    return parser


def _configure_logging(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)


def _admin_key_id(request: web.BaseRequest) -> str | None:
    from admin_api.admin_auth import admin_key_key

    key = request.get(admin_key_key)
    return None if key is None else key.id


async def _start_site(
    runner: web.AppRunner,
    where: ListenAddress,
    shutdown_timeout: float,
    *,
    reuse_port: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    from aiohttp import web

    await runner.setup()
    site = web.TCPSite(
        runner,
        where.host,
        where.port,
        shutdown_timeout=shutdown_timeout,
        backlog=1024,
        reuse_port=reuse_port,
        ssl_context=ssl_context,
    )
    await site.start()


async def run_planes(
    settings: Settings,
    planes: Sequence[str],
    *,
    demo_upstream: ListenAddress | None = None,
    reuse_port: bool = False,
    parent_pid: int | None = None,
    worker: int = 0,
    migrate: bool | None = None,
) -> None:
    """Run the given planes until SIGTERM or SIGINT (or, for a worker, its parent's death), then drain
    in-flight requests and return. SIGHUP reloads the TLS certificates."""
    from aiohttp import web

    from admin_api.admin_auth import AdminAuthenticator
    from admin_api.app import create_admin_app
    from gateway.access_log import AccessLog, aiohttp_access_logger
    from gateway.core import open_core
    from gateway.demo_upstream import create_demo_upstream_app
    from gateway.forward_auth import forward_auth_handler_key
    from gateway.http_server import HandlerSite, HttpRunner
    from gateway.metrics.listener import create_metrics_app
    from gateway.proxy_app import create_proxy_app

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    certificates: list[ServerTls] = []
    loop.add_signal_handler(signal.SIGHUP, lambda: [tls.reload() for tls in certificates])
    watch = asyncio.create_task(_stop_when_orphaned(parent_pid, stop)) if parent_pid is not None else None

    runners: list[web.AppRunner] = []
    access = None
    if settings.access_log:
        access = AccessLog.open(settings.access_log_file, json=settings.log_format == "json")
    try:
        if demo_upstream is not None:
            runners.append(web.AppRunner(create_demo_upstream_app(), access_log=None))
            await _start_site(runners[-1], demo_upstream, 1.0)
            log.info("demo upstream listening on http://%s", demo_upstream)

        async with open_core(settings, migrate=migrate) as core:
            if "admin" in planes:
                authenticator = AdminAuthenticator(
                    core.store,
                    core.hasher,
                    prefix=settings.token_prefix,
                    failure_limit=settings.failure_limit_per_source,
                    failure_window=settings.failure_window,
                )
                generated = await authenticator.bootstrap(settings.admin_key)
                if generated is not None:
                    print(
                        "\nNo admin key was configured, so one was generated. It is shown only this once:\n\n"
                        f"    {generated}\n\nKeep it safe; set GATEWAY_ADMIN_KEY to choose your own.\n",
                        file=sys.stderr,
                        flush=True,
                    )
                admin = (
                    web.AppRunner(
                        create_admin_app(core, authenticator),
                        access_log_class=aiohttp_access_logger(access, _admin_key_id),
                        access_log=logging.getLogger("admin_api.access"),
                    )
                    if access is not None
                    else web.AppRunner(create_admin_app(core, authenticator), access_log=None)
                )
                runners.insert(0, admin)
                tls = _server_tls("admin API", settings.admin_tls_cert, settings.admin_tls_key)
                certificates += [tls] if tls is not None else []
                await _start_site(
                    admin,
                    settings.admin_listen,
                    settings.shutdown_timeout,
                    ssl_context=tls.context if tls is not None else None,
                )
                log.info("admin API listening on %s://%s", "https" if tls else "http", settings.admin_listen)
            if "proxy" in planes:
                proxy = HttpRunner(create_proxy_app(core), access_log=access, shutdown_timeout=settings.shutdown_timeout)
                runners.insert(0, proxy)
                tls = _server_tls("proxy", settings.proxy_tls_cert, settings.proxy_tls_key)
                certificates += [tls] if tls is not None else []
                if settings.upstream is not None:
                    await _start_site(
                        proxy,
                        settings.proxy_listen,
                        settings.shutdown_timeout,
                        reuse_port=reuse_port,
                        ssl_context=tls.context if tls is not None else None,
                    )
                    log.info(
                        "proxy listening on %s://%s -> %s",
                        "https" if tls else "http",
                        settings.proxy_listen,
                        settings.upstream,
                    )
                else:
                    await proxy.setup()
                if (where := settings.forward_auth_listen) is not None:
                    site = HandlerSite(
                        proxy,
                        where.host,
                        where.port,
                        handler=proxy.app[forward_auth_handler_key],
                        backlog=1024,
                        reuse_port=reuse_port,
                    )
                    await site.start()
                    log.info(
                        "forward-auth listening on http://%s (%s convention)",
                        where,
                        settings.forward_auth_convention,
                    )
            if settings.metrics_listen is not None:
                where = settings.metrics_listen
                where = ListenAddress(where.host, where.port + worker if where.port else 0)
                check = None
                if not settings.metrics_public:
                    check = AdminAuthenticator(core.store, core.hasher, prefix=settings.token_prefix).authenticate
                runners.append(web.AppRunner(create_metrics_app(core, check), access_log=None))
                await _start_site(runners[-1], where, 1.0)
                log.info("metrics listening on http://%s/metrics", where)
            await stop.wait()
            log.info("stopping: draining in-flight requests (up to %gs)", settings.shutdown_timeout)
            for runner in runners:  # the proxy first: it drains while the core is still open
                await runner.cleanup()
            runners.clear()
    finally:
        for runner in runners:
            await runner.cleanup()
        if watch is not None:
            watch.cancel()
        if access is not None:
            access.close()  # after the runners: every drained request has its line
    log.info("stopped")


def _server_tls(name: str, cert: Path | None, key: Path | None) -> ServerTls | None:
    return ServerTls(name, cert, key) if cert is not None and key is not None else None


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop: libuv's event loop roughly halves the cost of each socket operation on the hot path."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coroutine)


async def _stop_when_orphaned(parent_pid: int, stop: asyncio.Event) -> None:
    """A worker whose parent died (even by SIGKILL) stops too, instead of serving on alone."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(1.0)
    log.warning("the parent process is gone; stopping")
    stop.set()


async def migrate_store(settings: Settings) -> str:
    """`gateway migrate`: one line saying where the schema went."""
    from gateway.core import create_store

    store = create_store(settings, migrate=False)
    try:
        await store.open()
    except SchemaOutdated as outdated:
        store = create_store(settings, migrate=True)
        await store.open()  # upgrades, under the backend's lock
        await store.close()
        return f"upgraded the store's schema from version {outdated.found} to {outdated.newest}"
    await store.close()
    return "the store's schema is already the newest this gateway knows; nothing to do"


def _proxy_worker(settings: Settings, parent_pid: int, worker: int, migrate: bool | None) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload relayed before the loop runs must not kill us
    _configure_logging(settings)
    try:
        _run(
            run_planes(settings, ("proxy",), reuse_port=True, parent_pid=parent_pid, worker=worker, migrate=migrate)
        )
    except (OSError, SchemaError, StoreUnavailable) as error:
        print(f"gateway: cannot start: {_reason(error)}", file=sys.stderr)
        raise SystemExit(1) from None


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def _run_workers(settings: Settings, workers: int, migrate: bool | None) -> int:
    """The parent of `gateway proxy --workers N`: starts N processes on one port, relays SIGTERM, waits."""
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_proxy_worker, args=(settings, os.getpid(), n, migrate), name=f"proxy-{n}")
        for n in range(workers)
    ]
    for process in processes:
        process.start()

    def relay(signum: int, frame: object) -> None:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, relay)
    for process in processes:
        process.join()
    return max((process.exitcode or 0) for process in processes)


def main(argv: Sequence[str] | None = None) -> None:
    arguments = build_parser().parse_args(argv)
    if arguments.command not in PLANES:
        raise SystemExit(admin_cli.commands.run(arguments, os.environ))
    planes = PLANES[arguments.command]
    overrides: dict[str, Any] = {name: getattr(arguments, name) for name in FLAG_SETTINGS}
    overrides["forward_auth_listen"] = getattr(arguments, "forward_auth_listen", None)
    demo: ListenAddress | None = None
    workers = getattr(arguments, "workers", 1)
    try:
        if getattr(arguments, "demo_upstream", None) is not None:
            demo = parse_listen_address(arguments.demo_upstream)
            overrides["upstream"] = overrides["upstream"] or f"http://{demo}"
        settings = load_settings(config_path=arguments.config, overrides=overrides)
        if "proxy" in planes and settings.forward_auth_listen is None:
            settings.require_upstream()
        separate = arguments.command in ("proxy", "admin")
        if separate and settings.redis_url is None and settings.postgres_url is None:
            raise SettingsError(
                f"'gateway {arguments.command}' runs beside other gateway processes, which hear of token changes"
                " on a SQLite store only through Redis: set GATEWAY_REDIS_URL, use PostgreSQL"
                " (GATEWAY_DATABASE_URL=postgresql://...), or run 'gateway serve' for one process"
            )
        if not 1 <= workers <= 64:
            raise SettingsError("--workers must be between 1 and 64")
        if "admin" in planes and (problem := settings.admin_exposure_problem()) is not None:
            raise SettingsError(problem)
    except (SettingsError, ValueError) as error:
        print(f"gateway: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    _configure_logging(settings)
    if arguments.command == "migrate":
        try:
            print(f"gateway: {asyncio.run(migrate_store(settings))}", file=sys.stderr)
        except (SchemaError, StoreUnavailable) as error:
            print(f"gateway: cannot migrate: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        return
    migrate = True if getattr(arguments, "migrate", False) else None  # None: the backend's default
    if workers > 1:
        raise SystemExit(_run_workers(settings, workers, migrate))
    try:
        _run(run_planes(settings, planes, demo_upstream=demo, migrate=migrate))
    except (OSError, ssl.SSLError, SchemaError, StoreUnavailable) as error:
        print(f"gateway: cannot start: {_reason(error)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
