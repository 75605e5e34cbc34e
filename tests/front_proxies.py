"""Real nginx and Caddy in front of a real upstream, asking the gateway's forward-auth port before each request.

Each runs as a subprocess with a generated config in a test's temporary directory (pid, logs and temporary
files inside it) on a free loopback port. The nginx config is the one README.md offers to copy.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.redis_server import free_port

NGINX_SITE = """\
upstream gateway_auth {{
    server 127.0.0.1:{auth_port};
    keepalive 16;
}}
upstream api {{
    server 127.0.0.1:{upstream_port};
    keepalive 16;
}}
server {{
    listen 127.0.0.1:{port};

    location / {{
        auth_request /.gateway/auth;
        auth_request_set $gateway_token_id $upstream_http_x_gateway_token_id;
        auth_request_set $gateway_access_level $upstream_http_x_gateway_access_level;
        auth_request_set $gateway_status $upstream_status;
        error_page 500 = @gateway_refused;

        proxy_set_header X-Gateway-Token-Id $gateway_token_id;
        proxy_set_header X-Gateway-Access-Level $gateway_access_level;
        proxy_set_header Authorization "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_pass http://api;  # no URI part: the request target goes upstream exactly as it was judged
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

    # auth_request passes 401 and 403 on and turns any other answer into 500: say which it was.
    location @gateway_refused {{
        internal;
        if ($gateway_status = 429) {{ return 429; }}
        if ($gateway_status = 400) {{ return 400; }}
        if ($gateway_status = 503) {{ return 503; }}
        return 500;
    }}
}}
"""

NGINX_MAIN = """\
{user}
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{
    worker_connections 256;
}}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
{site}
}}
"""

CADDYFILE = """\
{{
    admin off
    auto_https off
}}
http://127.0.0.1:{port} {{
    forward_auth 127.0.0.1:{auth_port} {{
        uri /.gateway/auth
        copy_headers X-Gateway-Token-Id X-Gateway-Access-Level
    }}
    reverse_proxy 127.0.0.1:{upstream_port} {{
        header_up -Authorization
    }}
}}
"""


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                output = log.read_text() if log.exists() else ""
                raise RuntimeError(f"the front proxy did not start: {output[-2000:]}") from None
            time.sleep(0.02)


class FrontProxy:
    """One nginx or Caddy process; `url` is where clients call it."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def nginx_site(*, port: int, auth_port: int, upstream_port: int) -> str:
    return NGINX_SITE.format(port=port, auth_port=auth_port, upstream_port=upstream_port)


def start_nginx(directory: Path, *, auth_port: int, upstream_port: int) -> FrontProxy:
    executable = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if executable is None:
        raise RuntimeError("nginx is not installed: run scripts/test, which installs it")
    (directory / "logs").mkdir(parents=True, exist_ok=True)  # nginx opens its default error log first
    port = free_port()
    site = nginx_site(port=port, auth_port=auth_port, upstream_port=upstream_port)
    config = directory / "nginx.conf"
    # As root, workers would switch to nobody, who cannot enter the test's private temporary directory.
    user = "user root;" if os.geteuid() == 0 else ""
    config.write_text(NGINX_MAIN.format(user=user, directory=directory, site=site))
    log = directory / "error.log"
    process = subprocess.Popen(
        [executable, "-p", str(directory), "-c", str(config), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_port(port, process, log)
    return FrontProxy(process, port)


def start_caddy(directory: Path, *, auth_port: int, upstream_port: int) -> FrontProxy:
    executable = shutil.which("caddy")
    if executable is None:
        raise RuntimeError("caddy is not installed: run scripts/test, which installs it")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = directory / "Caddyfile"
    config.write_text(CADDYFILE.format(port=port, auth_port=auth_port, upstream_port=upstream_port))
    log = directory / "caddy.log"
    environment = {**os.environ, "HOME": str(directory), "XDG_DATA_HOME": str(directory), "XDG_CONFIG_HOME": str(directory)}
    with log.open("wb") as output:
        process = subprocess.Popen(
            [executable, "run", "--config", str(config), "--adapter", "caddyfile"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=environment,
        )
    _wait_for_port(port, process, log)
    return FrontProxy(process, port)
