"""The command line and composition root: the only module that knows both planes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from admin_api.admin_auth import AdminAuthenticator
from admin_api.app import create_admin_app
from gateway import __version__
from gateway.core import open_core
from gateway.demo_upstream import create_demo_upstream_app
from gateway.proxy_app import ProxyAccessLogger, create_proxy_app
from gateway.settings import ListenAddress, Settings, SettingsError, load_settings, parse_listen_address

log = logging.getLogger("gateway")

FLAG_SETTINGS = ("upstream", "proxy_listen", "admin_listen", "database_url", "trusted_proxies", "log_level")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="API-token authentication gateway")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy and the admin API in one process")
    serve.add_argument("--config", help="TOML config file (default: $GATEWAY_CONFIG, else built-in defaults)")
    for name in FLAG_SETTINGS:
        serve.add_argument("--" + name.replace("_", "-"), dest=name, metavar=name.upper())
    serve.add_argument(
        "--demo-upstream",
        metavar="HOST:PORT",
        nargs="?",
        const="127.0.0.1:8090",
        help="also run a demo upstream that echoes requests (default 127.0.0.1:8090) and use it as upstream",
    )
    return parser


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _start_site(runner: web.AppRunner, where: ListenAddress, shutdown_timeout: float) -> None:
    await runner.setup()
    site = web.TCPSite(runner, where.host, where.port, shutdown_timeout=shutdown_timeout, backlog=1024)
    await site.start()


async def serve(settings: Settings, demo_upstream: ListenAddress | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    runners: list[web.AppRunner] = []
    if demo_upstream is not None:
        runners.append(web.AppRunner(create_demo_upstream_app(), access_log=None))
        await _start_site(runners[-1], demo_upstream, 1.0)
        log.info("demo upstream listening on http://%s", demo_upstream)

    async with open_core(settings) as core:
        authenticator = AdminAuthenticator(core.store, core.hasher, prefix=settings.token_prefix)
        generated = await authenticator.bootstrap(settings.admin_key)
        if generated is not None:
            print(
                f"\nNo admin key was configured, so one was generated. It is shown only this once:\n\n"
                f"    {generated}\n\nKeep it safe; set GATEWAY_ADMIN_KEY to choose your own.\n",
                file=sys.stderr,
                flush=True,
            )
        proxy = web.AppRunner(
            create_proxy_app(core),
            access_log_class=ProxyAccessLogger,
            access_log=logging.getLogger("gateway.access") if settings.access_log else None,
        )
        admin = web.AppRunner(
            create_admin_app(core, authenticator),
            access_log=logging.getLogger("admin_api.access") if settings.access_log else None,
        )
        try:
            await _start_site(proxy, settings.proxy_listen, settings.shutdown_timeout)
            runners.insert(0, proxy)
            await _start_site(admin, settings.admin_listen, settings.shutdown_timeout)
            runners.insert(1, admin)
            log.info(
                "gateway listening: proxy on http://%s -> %s, admin API on http://%s",
                settings.proxy_listen,
                settings.upstream,
                settings.admin_listen,
            )
            await stop.wait()
            log.info("stopping: draining in-flight requests (up to %gs)", settings.shutdown_timeout)
        finally:
            for runner in runners:
                await runner.cleanup()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    arguments = _parser().parse_args(argv)
    overrides: dict[str, Any] = {name: getattr(arguments, name) for name in FLAG_SETTINGS}
    demo: ListenAddress | None = None
    try:
        if arguments.demo_upstream is not None:
            demo = parse_listen_address(arguments.demo_upstream)
            overrides["upstream"] = overrides["upstream"] or f"http://{demo}"
        settings = load_settings(config_path=arguments.config, overrides=overrides)
        settings.require_upstream()
    except (SettingsError, ValueError) as error:
        print(f"gateway: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    _configure_logging(settings)
    try:
        asyncio.run(serve(settings, demo))
    except OSError as error:
        print(f"gateway: cannot start: {error.strerror or error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
