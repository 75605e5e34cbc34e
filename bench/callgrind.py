"""Instructions per proxied request of `gateway serve`, counted by callgrind: a cost that load on a shared
machine does not move (wall-clock rates and even CPU time do).

Starts the nginx upstream of bench/run and `gateway serve` under `valgrind --tool=callgrind` with
instrumentation off, creates a read_only token, sends --warmup requests, then counts the gateway process's
user-space instructions over exactly --requests more (keep-alive GETs of /api/posts over --connections
connections, each answered 200). Kernel work (the reads and writes) is not counted: `strace -c` gives that
(bench/profile.py). Repeated runs agree within about 0.5 %.

    apt-get install valgrind nginx
    .venv/bin/python bench/callgrind.py [--ref REF] [--access-log] [--requests 6000] [--out FILE]

`--ref` measures the gateway as committed at REF (the venv's dependencies); the callgrind output (for
callgrind_annotate) is kept at --out.
"""

from __future__ import annotations

import argparse
import asyncio
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


async def measure(workdir: Path, fleet: Fleet, arguments: argparse.Namespace) -> int:
    upstream_port = free_port()
    (workdir / "files").mkdir()
    start_nginx(fleet, "nginx-upstream", upstream_server(upstream_port, free_port(), workdir / "files"))
    upstream = f"http://127.0.0.1:{upstream_port}"
    await wait_http(upstream + API_PATH, expect=200)
    proxy_port, admin_port = free_port(), free_port()
    env = gateway_env(
        fleet,
        upstream,
        "callgrind.db",
        access_log=arguments.access_log,
        GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}",
        GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}",
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
    token = await create_token(gateway)
    request = (
        f"GET {API_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{proxy_port}\r\nAuthorization: Bearer {token.secret}\r\n"
        "User-Agent: bench-callgrind\r\nAccept: */*\r\n\r\n"
    ).encode()
    await drive(proxy_port, request, arguments.warmup, arguments.connections)
    pid = str(fleet.pid("gateway"))
    subprocess.run(["callgrind_control", "--instr=on", pid], check=True, capture_output=True)
    await drive(proxy_port, request, arguments.requests, arguments.connections)
    subprocess.run(["callgrind_control", "--instr=off", pid], check=True, capture_output=True)
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
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "gateway-callgrind.out")
    arguments = parser.parse_args()
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
    print(
        f"{commit}, access log {log}: {instructions:,} instructions for {arguments.requests} requests,"
        f" {instructions / arguments.requests:,.0f} per request"
    )


if __name__ == "__main__":
    main()
