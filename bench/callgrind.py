"""Instructions per proxied request of `gateway serve`, counted by callgrind: a cost that load on a shared
machine does not move (wall-clock rates and even CPU time do).

Starts the nginx upstream of bench/run and `gateway serve` under `valgrind --tool=callgrind` with
instrumentation off, creates a read_only token, sends --warmup requests, then counts the gateway process's
user-space instructions over exactly --requests more (keep-alive GETs of /api/posts over --connections
connections, each answered 200). `--redis` gives the gateway a redis-server (GATEWAY_REDIS_URL); `--limited`
(implies --redis) limits the token to 100 000 requests per second, never refused, so that every request runs
the limits script, and also prints what redis-server counted (INFO commandstats: calls of EVALSHA and its
own microseconds per call) and the CPU seconds redis-server used meanwhile. Kernel work (the reads and
writes) is not counted: `strace -c` gives that
(bench/profile.py). Repeated runs agree within about 0.5 %.

    apt-get install valgrind nginx
    .venv/bin/python bench/callgrind.py [--ref REF] [--access-log] [--redis] [--limited] [--requests 6000]
                                        [--out FILE]

`--ref` measures the gateway as committed at REF (the venv's dependencies); the callgrind output (for
callgrind_annotate) is kept at --out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from services import (
    API_PATH,
    Fleet,
    Gateway,
    create_token,
    export_gateway,
    free_port,
    gateway_env,
    start_nginx,
    start_redis,
    upstream_server,
    wait_http,
)

_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


async def drive(port: int, request: bytes, total: int, connections: int) -> None:
    """`total` requests, spread over `connections` keep-alive connections; each must be answered 200."""

    async def one(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(count):
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = _LENGTH.search(head)
                if not head.startswith(b"HTTP/1.1 200") or length is None:
                    raise RuntimeError(f"unexpected answer: {head[:200]!r}")
                await reader.readexactly(int(length.group(1)))
        finally:
            writer.close()

    share, rest = divmod(total, connections)
    await asyncio.gather(*(one(share + (index < rest)) for index in range(connections)))


async def redis_info(port: int, section: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"INFO {section}\r\n".encode())
        size = int((await reader.readline())[1:])
        return (await reader.readexactly(size + 2)).decode()
    finally:
        writer.close()


def evalsha_stats(info: str) -> tuple[int, int]:
    """(calls, microseconds) of EVALSHA in an INFO commandstats answer."""
    found = re.search(r"^cmdstat_evalsha:calls=(\d+),usec=(\d+)", info, re.MULTILINE)
    return (0, 0) if found is None else (int(found.group(1)), int(found.group(2)))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(workdir: Path, fleet: Fleet, arguments: argparse.Namespace) -> int:
    upstream_port = free_port()
    (workdir / "files").mkdir()
    start_nginx(fleet, "nginx-upstream", upstream_server(upstream_port, free_port(), workdir / "files"))
    upstream = f"http://127.0.0.1:{upstream_port}"
    await wait_http(upstream + API_PATH, expect=200)
    proxy_port, admin_port = free_port(), free_port()
    redis_port = await start_redis(fleet) if arguments.redis else None
    redis_env = {} if redis_port is None else {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    env = gateway_env(
        fleet,
        upstream,
        "callgrind.db",
        access_log=arguments.access_log,
        GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}",
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
        **redis_env,
    )
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={arguments.out}"]
    fleet.spawn("gateway", [*valgrind, sys.executable, "-m", "gateway", "serve"], env=env)
    gateway = Gateway(f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}", "gateway")
    try:
        await wait_http(gateway.admin + "/healthz", timeout=300)  # Python starts ~50x slower under valgrind
        await wait_http(gateway.proxy + API_PATH, timeout=300, expect=401)
    except RuntimeError:
        fleet.check_alive("gateway")
        raise
    limits = {"rate_limit": {"requests": 100_000, "per_seconds": 1}} if arguments.limited else {}
    token = await create_token(gateway, **limits)
    request = (
        f"GET {API_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{proxy_port}\r\nAuthorization: Bearer {token.secret}\r\n"
        "User-Agent: bench-callgrind\r\nAccept: */*\r\n\r\n"
    ).encode()
    await drive(proxy_port, request, arguments.warmup, arguments.connections)
    pid = str(fleet.pid("gateway"))
    subprocess.run(["callgrind_control", "--instr=on", pid], check=True, capture_output=True)
    if redis_port is not None:
        calls, usec = evalsha_stats(await redis_info(redis_port, "commandstats"))
        redis_cpu = cpu_seconds(fleet.pid("redis"))
    await drive(proxy_port, request, arguments.requests, arguments.connections)
    subprocess.run(["callgrind_control", "--instr=off", pid], check=True, capture_output=True)
    if redis_port is not None:
        redis_cpu = cpu_seconds(fleet.pid("redis")) - redis_cpu
        more_calls, more_usec = evalsha_stats(await redis_info(redis_port, "commandstats"))
        calls, usec = more_calls - calls, more_usec - usec
        print(
            f"redis-server: {calls} EVALSHA ({arguments.requests / max(1, calls):.2f} requests each),"
            f" {usec / max(1, calls):.1f} µs per EVALSHA, {usec / arguments.requests:.1f} µs per request;"
            f" {redis_cpu:.2f} CPU seconds meanwhile (the gateway ran under valgrind, so redis idled)"
        )
    subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True)
    dumps = sorted(Path(arguments.out).parent.glob(Path(arguments.out).name + ".*"))
    totals = [re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.MULTILINE) for dump in dumps]
    counted = [int(found.group(1)) for found in totals if found is not None and int(found.group(1)) > 0]
    if not counted:
        raise RuntimeError(f"callgrind wrote no counts to {arguments.out}.*")
    return counted[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", help="measure the gateway as committed at this ref, not the working tree")
    parser.add_argument("--access-log", action="store_true", help="the access log on, to a file (the default)")
    parser.add_argument("--redis", action="store_true", help="with a redis-server (GATEWAY_REDIS_URL)")
    parser.add_argument("--limited", action="store_true", help="a token limited to 100 000/s (with --redis)")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "gateway-callgrind.out")
    arguments = parser.parse_args()
    arguments.redis = arguments.redis or arguments.limited
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed: apt-get install valgrind")
    for old in Path(arguments.out).parent.glob(Path(arguments.out).name + "*"):
        old.unlink()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-callgrind-"))
    gateway_path, commit = export_gateway(arguments.ref, workdir) if arguments.ref else (None, "working tree")
    fleet = Fleet(workdir, gateway_path=gateway_path)
    try:
        instructions = asyncio.run(measure(workdir, fleet, arguments))
    finally:
        fleet.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    log = "on" if arguments.access_log else "off"
    token = ", limited token" if arguments.limited else ", redis" if arguments.redis else ""
    print(
        f"{commit}, access log {log}{token}: {instructions:,} instructions for {arguments.requests} requests,"
        f" {instructions / arguments.requests:,.0f} per request"
    )


if __name__ == "__main__":
    main()
