"""The processes a benchmark runs on loopback: nginx (upstream and proxy), redis, the gateway and the floor.

Every process is started in its own session, so that stopping it (SIGTERM to its group, then SIGKILL) also
ends what it spawned, such as the workers of `gateway proxy --workers 2`; and a Ctrl-C reaches only the
orchestrator, which then stops everything in order.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp

T = TypeVar("T")
BENCH = Path(__file__).resolve().parent
ADMIN_KEY = "bench-admin-key-0123456789abcdef"
# About 100 bytes of JSON, answered by nginx from memory: the upstream costs as little as an upstream can.
UPSTREAM_BODY = (
    '{"ok":true,"service":"bench upstream","items":[1,2,3],"padding":"0123456789abcdef0123456789"}'
)
API_PATH = "/api/posts"  # read_only allows GET on every path
DOWNLOAD_PREFIX = "/api/media/"  # nginx serves the body files from the work directory
UPLOAD_PATH = "/api/posts/upload"  # editorial allows POST here; nginx streams it to the sink


async def until_signalled(work: Awaitable[T]) -> T:
    """Runs `work`, cancelled on SIGINT or SIGTERM (even where a shell started us with SIGINT ignored)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    return await work


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def need(program: str) -> str:
    path = shutil.which(program) or (
        shutil.which(program, path="/usr/sbin:/sbin") if program == "nginx" else None
    )
    if path is None:
        sys.exit(
            f"{program} is not installed: bench/run installs it (apt-get install nginx wrk redis-server)"
        )
    return path


async def wait_http(
    url: str, timeout: float = 30, *, headers: dict[str, str] | None = None, expect: int | None = None
) -> None:
    """Until `url` answers (below 500, or exactly `expect`): a server is up when it serves, not forks."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                # ssl=False: the TLS targets serve a self-signed certificate made for the run
                async with session.get(url, headers=headers, ssl=False) as response:
                    if (response.status == expect) if expect is not None else response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.05)


class Fleet:
    """The processes of one benchmark run, each with its log file in the work directory."""

    def __init__(self, workdir: Path, *, gateway_path: Path | None = None) -> None:
        self.workdir = workdir
        self.gateway_path = gateway_path  # where `gateway` is imported from, if not the working tree
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(
        self, name: str, argv: list[str], *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        with open(self.workdir / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                argv,
                env={**base, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.workdir,
            )
        self._processes[name] = process
        return process

    def pid(self, name: str) -> int:
        return self._processes[name].pid

    def groups(self, names: list[str] | None = None) -> list[int]:
        """Process group ids (each process leads its own): for CPU accounting."""
        return [process.pid for name, process in self._processes.items() if names is None or name in names]

    def threads(self, names: list[str]) -> list[int]:
        """Every thread of every process in these processes' groups (their workers included)."""
        groups = set(self.groups(names))
        return [
            int(task.name)
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and _group_of(entry) in groups
            for task in (entry / "task").glob("*")
        ]

    def check_alive(self, name: str) -> None:
        process = self._processes[name]
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")

    def describe(self, name: str) -> str:
        """Whether a process (and how many of its group) still runs: for telling a hang from a death."""
        process = self._processes[name]
        if process.poll() is not None:
            return f"{name} exited with {process.returncode}"
        alive = sum(
            1 for entry in Path("/proc").iterdir() if entry.name.isdigit() and _group_of(entry) == process.pid
        )
        return f"{name} runs ({alive} process(es) in its group)"

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, name: str) -> None:
        process = self._processes.pop(name, None)
        if process is None:
            return
        for signum, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signum)  # its own group: it and its children, nothing else
                except ProcessLookupError:
                    pass
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        if process.poll() is None:
            process.kill()

    def stop_all(self) -> None:
        for name in reversed(list(self._processes)):
            self.stop(name)


@contextmanager
def on_one_core(threads: list[int], cpu: int) -> Iterator[None]:
    """Keep these threads on one core for a while, then let them run anywhere again."""
    everywhere = os.sched_getaffinity(0)
    for thread in threads:
        with suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(thread, {cpu})
    try:
        yield
    finally:
        for thread in threads:
            with suppress(OSError):
                os.sched_setaffinity(thread, everywhere)


def _group_of(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


# --- nginx ----------------------------------------------------------------------------------------------


def _nginx_conf(prefix: Path, body: str) -> str:
    # As root, the workers would otherwise switch to `nobody` and could not read the work directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
{body}
}}
"""


def start_nginx(fleet: Fleet, name: str, body: str) -> None:
    """One nginx with one worker (the gateway under test has one process too)."""
    prefix = fleet.workdir / name
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(_nginx_conf(prefix, body))
    fleet.spawn(
        name,
        [need("nginx"), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
    )


CADDY_USER, CADDY_PASSWORD = "bench", "caddy-bench-password"


def start_caddy(fleet: Fleet, port: int, upstream_port: int) -> str:
    """Caddy 2 as the Go gateway a user might pick instead: HTTP basic auth against a bcrypt hash (Caddy keeps
    a cache of verified credentials) and a remote_ip allow-list, in front of the same upstream. Returns the
    Authorization value its clients send."""
    caddy = need("caddy")
    hashed = subprocess.run(
        [caddy, "hash-password", "--plaintext", CADDY_PASSWORD], capture_output=True, text=True, check=True
    ).stdout.strip()
    prefix = fleet.workdir / "caddy"
    prefix.mkdir()
    (prefix / "Caddyfile").write_text(
        f"""{{
\tadmin off
\tauto_https off
}}
http://127.0.0.1:{port} {{
\t@outside not remote_ip 127.0.0.0/8
\trespond @outside 403
\tbasicauth {{
\t\t{CADDY_USER} {hashed}
\t}}
\treverse_proxy 127.0.0.1:{upstream_port}
}}
"""
    )
    fleet.spawn(
        "caddy",
        [caddy, "run", "--config", str(prefix / "Caddyfile"), "--adapter", "caddyfile"],
        env={"HOME": str(prefix), "XDG_DATA_HOME": str(prefix), "XDG_CONFIG_HOME": str(prefix)},
    )
    credentials = base64.b64encode(f"{CADDY_USER}:{CADDY_PASSWORD}".encode()).decode()
    return f"Basic {credentials}"


def upstream_server(port: int, sink_port: int, files: Path) -> str:
    return f"""    upstream sink {{ server 127.0.0.1:{sink_port}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{UPSTREAM_BODY}';
        }}
        location {DOWNLOAD_PREFIX} {{ alias {files}/; }}
        location = {UPLOAD_PATH} {{
            client_max_body_size 0;
            proxy_request_buffering off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://sink;
        }}
    }}"""


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1 and its key, for the TLS targets."""
    cert, key = workdir / "tls.crt", workdir / "tls.key"
    subprocess.run(
        [
            need("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def proxy_server(port: int, upstream_port: int, tls: tuple[Path, Path] | None = None) -> str:
    """nginx as a keep-alive reverse proxy; with `tls` (certificate, key) it serves TLS 1.2+ as the gateway
    does."""
    listen = f"listen 127.0.0.1:{port} backlog=4096"
    if tls is not None:
        listen += (
            f" ssl;\n        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3"
        )
    return f"""    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        {listen};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def forward_auth_server(port: int, auth_port: int, upstream_port: int) -> str:
    """nginx as the reverse proxy, asking the gateway's forward-auth port first (`auth_request`): the README's
    configuration, with the benchmark's keep-alive settings."""
    return f"""    upstream gateway_auth {{
        server 127.0.0.1:{auth_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            auth_request /.gateway/auth;
            auth_request_set $gateway_token_id $upstream_http_x_gateway_token_id;
            auth_request_set $gateway_access_level $upstream_http_x_gateway_access_level;
            proxy_set_header X-Gateway-Token-Id $gateway_token_id;
            proxy_set_header X-Gateway-Access-Level $gateway_access_level;
            proxy_set_header Authorization "";
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location = /.gateway/auth {{
            internal;
            proxy_pass http://gateway_auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


# --- the gateway ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    id: str
    secret: str  # the whole token string, as a client presents it


@dataclass(frozen=True)
class Gateway:
    proxy: str  # base URL of the data plane
    admin: str  # base URL of the admin API
    process: str  # the fleet name of the proxy process (the one whose memory and CPU we watch)


def gateway_env(
    fleet: Fleet, upstream: str, database: str, *, access_log: bool = True, **extra: str
) -> dict[str, str]:
    """The gateway's defaults, as a user runs it: the access log on, here written to a file of the run (a
    terminal would measure the terminal). `access_log=False` is the tuned variant shown beside it."""
    source = {"PYTHONPATH": str(fleet.gateway_path)} if fleet.gateway_path is not None else {}
    log = (
        {"GATEWAY_ACCESS_LOG_FILE": str(fleet.workdir / f"{Path(database).stem}.access.log")}
        if access_log
        else {"GATEWAY_ACCESS_LOG": "false"}
    )
    return {
        "GATEWAY_UPSTREAM": upstream,
        "GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "GATEWAY_DATABASE_URL": f"sqlite:///{fleet.workdir / database}",
        **log,
        **source,
        **extra,
    }


def export_gateway(ref: str, workdir: Path) -> tuple[Path, str]:
    """The repository as committed at `ref`: a commit measured while the working tree is being edited.

    The exported copy comes first on PYTHONPATH, ahead of the editable install; dependencies are the venv's.
    """
    repo = BENCH.parent
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    source = workdir / "src"
    source.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", commit], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    return source, commit


async def start_gateway_serve(
    fleet: Fleet,
    upstream: str,
    *,
    name: str = "gateway-serve",
    tls: tuple[Path, Path] | None = None,
    access_log: bool = True,
    forward_auth_port: int | None = None,
) -> Gateway:
    """`gateway serve` with its defaults; with `tls` (certificate, key) its proxy port serves TLS; with
    `forward_auth_port` it also answers forward-auth requests there (nginx convention, loopback trusted)."""
    proxy_port, admin_port = free_port(), free_port()
    extra = {} if tls is None else {"GATEWAY_PROXY_TLS_CERT": str(tls[0]), "GATEWAY_PROXY_TLS_KEY": str(tls[1])}
    if forward_auth_port is not None:
        extra["GATEWAY_FORWARD_AUTH_LISTEN"] = f"127.0.0.1:{forward_auth_port}"
        extra["GATEWAY_TRUSTED_PROXIES"] = "127.0.0.1"
    env = gateway_env(
        fleet,
        upstream,
        f"{name}.db",
        access_log=access_log,
        GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}",
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
        **extra,
    )
    fleet.spawn(name, [sys.executable, "-m", "gateway", "serve"], env=env)
    scheme = "http" if tls is None else "https"
    gateway = Gateway(f"{scheme}://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}", name)
    await _wait_gateway(fleet, gateway, [name])
    return gateway


async def start_gateway_workers(fleet: Fleet, upstream: str, workers: int) -> Gateway:
    """`gateway admin` and `gateway proxy --workers N`, sharing the SQLite store and a redis-server."""
    redis_port, proxy_port, admin_port = await start_redis(fleet), free_port(), free_port()
    env = gateway_env(
        fleet,
        upstream,
        "gateway-workers.db",
        GATEWAY_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}",
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
    )
    fleet.spawn("gateway-admin", [sys.executable, "-m", "gateway", "admin"], env=env)
    fleet.spawn(
        "gateway-proxy", [sys.executable, "-m", "gateway", "proxy", "--workers", str(workers)], env=env
    )
    gateway = Gateway(f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}", "gateway-proxy")
    await _wait_gateway(fleet, gateway, ["gateway-admin", "gateway-proxy"])
    return gateway


async def start_redis(fleet: Fleet) -> int:
    """A redis-server on a free port, without persistence (fleet name "redis"): its port, once it listens."""
    port = free_port()
    fleet.spawn(
        "redis",
        [
            need("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(fleet.workdir),
        ],
    )
    await _wait_port(port)
    return port


async def _wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.05)


async def _wait_gateway(fleet: Fleet, gateway: Gateway, names: list[str]) -> None:
    try:
        await wait_http(gateway.admin + "/healthz")
        await wait_http(gateway.proxy + API_PATH, expect=401)
    except RuntimeError:
        for name in names:
            fleet.check_alive(name)
        raise


async def create_token(gateway: Gateway, access_level: str = "read_only", **limits: object) -> Token:
    """A real token through the admin API: argon2 hash in the store, an IP range and an access level (and
    `rate_limit` / `quota`, as the admin API takes them)."""
    body = {"name": "bench", "access_level": access_level, "allowed_ip_ranges": ["127.0.0.0/8"], **limits}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.admin + "/v1/tokens", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as response,
    ):
        if response.status != 201:
            raise RuntimeError(f"creating a token: {response.status} {await response.text()}")
        created = await response.json()
    return Token(str(created["id"]), str(created["token"]))


async def start_naive(fleet: Fleet, upstream: str) -> str:
    port = free_port()
    fleet.spawn(
        "naive-proxy",
        [sys.executable, str(BENCH / "naive_proxy.py"), "--port", str(port), "--upstream", upstream],
    )
    try:
        await wait_http(f"http://127.0.0.1:{port}{API_PATH}", expect=401)
    except RuntimeError:
        fleet.check_alive("naive-proxy")
        raise
    return f"http://127.0.0.1:{port}"


async def start_sink(fleet: Fleet) -> int:
    port = free_port()
    fleet.spawn("sink", [sys.executable, str(BENCH / "sink.py"), "--port", str(port)])
    await wait_http(f"http://127.0.0.1:{port}/")
    return port


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def reset_peak_rss(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so the next peak is this transfer's own."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False
