"""System calls per proxied request of `gateway serve`, counted by strace: the kernel side of a request's cost,
which callgrind (bench/callgrind.py) does not see, and which load on a shared machine does not move.

Starts the nginx upstream of bench/run and `gateway serve` (no tracer), creates a read_only token, sends
--warmup requests, then attaches `strace -c -f` to every thread of the gateway process and counts the calls
over exactly --requests more (the keep-alive GETs of bench/callgrind.py, over --connections connections).
Prints each call's count per request, and the total.

    apt-get install strace nginx
    .venv/bin/python bench/syscalls.py [--ref REF] [--access-log] [--requests 6000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from callgrind import drive
from services import (
    API_PATH,
    Fleet,
    Gateway,
    create_token,
    export_gateway,
    free_port,
    gateway_env,
    start_nginx,
    upstream_server,
    wait_http,
)


async def measure(workdir: Path, fleet: Fleet, arguments: argparse.Namespace) -> dict[str, int]:
    upstream_port = free_port()
    (workdir / "files").mkdir()
    start_nginx(fleet, "nginx-upstream", upstream_server(upstream_port, free_port(), workdir / "files"))
    upstream = f"http://127.0.0.1:{upstream_port}"
    await wait_http(upstream + API_PATH, expect=200)
    proxy_port, admin_port = free_port(), free_port()
    env = gateway_env(
        fleet,
        upstream,
        "syscalls.db",
        access_log=arguments.access_log,
        GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}",
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
    )
    fleet.spawn("gateway", [sys.executable, "-m", "gateway", "serve"], env=env)
    gateway = Gateway(f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}", "gateway")
    try:
        await wait_http(gateway.admin + "/healthz", timeout=60)
        await wait_http(gateway.proxy + API_PATH, timeout=60, expect=401)
    except RuntimeError:
        fleet.check_alive("gateway")
        raise
    token = await create_token(gateway)
    request = (
        f"GET {API_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{proxy_port}\r\nAuthorization: Bearer {token.secret}\r\n"
        "User-Agent: bench-syscalls\r\nAccept: */*\r\n\r\n"
    ).encode()
    await drive(proxy_port, request, arguments.warmup, arguments.connections)
    summary = workdir / "strace.txt"
    tracer = await asyncio.create_subprocess_exec(
        "strace", "-c", "-f", "-p", str(fleet.pid("gateway")), "-o", str(summary),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(1.0)  # attached (strace prints nothing on stdout when it is)
        await drive(proxy_port, request, arguments.requests, arguments.connections)
    finally:
        tracer.send_signal(signal.SIGINT)
        await tracer.wait()
    calls: dict[str, int] = {}
    for line in summary.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0].replace(".", "").isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    if not calls:
        raise RuntimeError(f"strace counted nothing: {summary.read_text()[:500]!r}")
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", help="measure the gateway as committed at this ref, not the working tree")
    parser.add_argument("--access-log", action="store_true", help="the access log on, to a file (the default)")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=32)
    arguments = parser.parse_args()
    if shutil.which("strace") is None:
        sys.exit("strace is not installed: apt-get install strace")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-syscalls-"))
    gateway_path, commit = export_gateway(arguments.ref, workdir) if arguments.ref else (None, "working tree")
    fleet = Fleet(workdir, gateway_path=gateway_path)
    try:
        calls = asyncio.run(measure(workdir, fleet, arguments))
    finally:
        fleet.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    total = sum(calls.values())
    log = "on" if arguments.access_log else "off"
    print(f"{commit}, access log {log}: {total / arguments.requests:.2f} system calls per request")
    for name, count in sorted(calls.items(), key=lambda item: -item[1]):
        if count / arguments.requests >= 0.005:
            print(f"  {count / arguments.requests:8.3f}  {name}")


if __name__ == "__main__":
    main()
