"""Where does the single-process gateway spend its time under load? Three views while wrk drives it at -c32.

Starts the nginx upstream and `gateway serve` as bench/run does, creates the same read_only token, warms up,
then, each during its own wrk run:

1. py-spy (native frames included): which Python and C functions the event-loop thread is in, sampled by
   wall clock whenever it is not sleeping (on a CPU, or runnable and waiting for one);
2. perf (cpu-clock): where the process's CPU time goes, by shared object (kernel, libpython, uvloop, ...) and
   by symbol: the on-CPU view, with the kernel's share that py-spy cannot see;
3. strace -c: the system calls per proxied request.

Prints, and writes to --out, a Markdown summary; with --stacks, keeps the collapsed py-spy stacks for a flame
graph (speedscope opens them as they are). The tools run as separate phases so that each disturbs only its
own figures. py-spy pauses the process for each sample, so the rate while it samples is lower.

    .venv/bin/pip install py-spy      # once; perf and strace are Debian's linux-perf and strace
    .venv/bin/python bench/profile.py [--ref HEAD] [--duration 15] [--connections 32] [--stacks FILE]
                                      [--out bench/results/profile.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from load import WrkResult, wrk, wrk_script
from report import gateway_source
from services import (
    API_PATH,
    BENCH,
    Fleet,
    create_token,
    export_gateway,
    free_port,
    need,
    start_gateway_serve,
    start_nginx,
    start_sink,
    until_signalled,
    upstream_server,
    wait_http,
)

_FRAME_LINE = re.compile(r":\d+\)$")
_SITE_PACKAGES = re.compile(r"\((?:/[^()]*/(?:site|dist)-packages/|/[^()]*/lib/python3\.\d+/)")
_PERF_ROW = re.compile(r"^\s*([\d.]+)%\s+(.+?)\s*$")


def _short(frame: str) -> str:
    """`send (asyncio/selector_events.py)`: the line number dropped, the path made short."""
    frame = _SITE_PACKAGES.sub("(", _FRAME_LINE.sub(")", frame))
    return frame.replace(str(BENCH.parent) + "/", "")


def _percent_table(counter: Counter[str], total: int, top: int, what: str) -> list[str]:
    rows = [f"| % | {what} |", "|---:|---|"]
    rows += [f"| {100 * count / max(1, total):.1f} | `{name}` |" for name, count in counter.most_common(top)]
    return rows


# A sample belongs to the first stage that a frame names, reading from the top of the stack down: a write()
# under StreamResponse.prepare is the response to the client, one under the upstream client the request
# upstream. A rule is a piece of the frame's text: a function's name or its module.
STAGES = (
    (
        "token: parse, cache lookup, memo digest",
        (
            "parse_token",
            "split_token",
            "presented_token",
            "TokenCache.",
            "memo_digest",
            "_secret_matches",
            "Authenticator.",
            "digests_equal",
            "(gateway/token_format.py)",
            "(gateway/credentials.py)",
        ),
    ),
    ("failure limits", ("(gateway/failure_limits.py)",)),
    ("client IP and IP ranges", ("(gateway/client_ip.py)", "(gateway/ranges.py)", "(netaddr/")),
    (
        "request target and access level: read_target, permits",
        ("(gateway/request_target.py)", "(gateway/access_levels.py)"),
    ),
    ("usage recording", ("(gateway/usage.py)",)),
    (
        "request head and response headers (forward.py)",
        ("upstream_request_head", "_forwarded_lines", "_connection_listed", "_response_headers", "gateway_headers",
         "_credential_headers"),
    ),
    ("upstream client: the gateway's pool (upstream_client/)", ("(gateway/upstream_client/",)),
    (
        "upstream client: aiohttp ClientSession",
        (
            "ClientSession.",
            "ClientRequest.",
            "ClientResponse.",
            "ResponseHandler.",
            "BaseConnector.",
            "TCPConnector.",
            "(aiohttp/client",
        ),
    ),
    ("aiohttp server: response to the client", ("(aiohttp/web_response.py)",)),
    (
        "aiohttp server: request parsing, dispatch, middleware",
        ("(aiohttp/web_", "problem_middleware", "(aiohttp/http_parser.py)"),
    ),
    ("gateway glue: ProxyHandler, forward", ("(gateway/proxy_app.py)", "(gateway/forward.py)")),
    ("proxy port's HTTP server (http_server.py: parse, answer, flow control)", ("(gateway/http_server.py)",)),
    ("garbage collector", ("gc_collect",)),
    ("event loop (uvloop / asyncio) and the rest", ()),
)
SYSCALL_LEAVES = (
    "write (libc",
    "read (libc",
    "getpid (libc",
    "epoll_pwait (libc",
    "epoll_wait (libc",
    "send (libc",
    "recv (libc",
    "writev (libc",
)


def _stage(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pieces in STAGES:
            if any(piece in frame for piece in pieces):
                return name
    return STAGES[-1][0]


def summarize_stacks(collapsed: Path, top: int) -> str:
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    stages_on_cpu: Counter[str] = Counter()
    total = in_syscall = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [
            _short(frame) for frame in stack.split(";") if not frame.startswith(("process ", "thread "))
        ]
        if not frames:
            continue
        count = int(count_text)
        total += count
        self_samples[frames[-1]] += count
        stages[_stage(frames)] += count
        if frames[-1].startswith(SYSCALL_LEAVES):
            in_syscall += count
        else:
            stages_on_cpu[_stage(frames)] += count
        for frame in set(frames):
            inclusive[frame] += count
        where = frames[-1][frames[-1].rfind("(") + 1 : -1]
        packages[where.split("/")[0] if "/" in where else where] += count
    return "\n".join(
        [
            f"{total} samples of the event-loop thread.",
            "",
            (
                "By stage of the request (each sample counted once). The second column leaves out the samples"
                " inside a system call: the gateway shares two cores with wrk and nginx, and is often"
                " preempted"
                " right after its write() wakes one of them"
                f" ({100 * in_syscall / max(1, total):.0f} % of the samples are in a system"
                " call; perf below gives their real CPU cost)."
            ),
            "",
            "| % of samples | % of samples outside system calls | stage |",
            "|---:|---:|---|",
            *(
                f"| {100 * count / max(1, total):.1f}"
                f" | {100 * stages_on_cpu[name] / max(1, total - in_syscall):.1f} |"
                f" `{name}` |"
                for name, count in stages.most_common()
            ),
            "",
            "Self (the frame on top of the stack):",
            "",
            *_percent_table(self_samples, total, top, "function"),
            "",
            "Inclusive (the frame anywhere on the stack):",
            "",
            *_percent_table(inclusive, total, top, "function"),
            "",
            "Self, by package, module or library:",
            "",
            *_percent_table(packages, total, top, "where"),
        ]
    )


def _perf_rows(report: str, top: int) -> list[str]:
    rows = ["| % of CPU | where |", "|---:|---|"]
    for line in report.splitlines():
        if line.startswith("#") or not (match := _PERF_ROW.match(line)):
            continue
        rows.append(f"| {float(match.group(1)):.1f} | `{' '.join(match.group(2).split())}` |")
        if len(rows) >= top + 2:
            break
    return rows


async def _output(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output = (await process.communicate())[0].decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({process.returncode}):\n{output[-2000:]}")
    return output


def _clock_ticks(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # utime, stime


class Session:
    """One gateway under load; each tool gets a wrk run of its own."""

    def __init__(
        self, workdir: Path, pid: int, url: str, script: Path, arguments: argparse.Namespace
    ) -> None:
        self.workdir, self.pid, self.url, self.script, self.arguments = workdir, pid, url, script, arguments

    async def under_load(
        self, tool: Callable[[], Awaitable[str]]
    ) -> tuple[WrkResult, str, tuple[float, float]]:
        """Runs `tool` (sampling for --duration) during a wrk run 2 s longer; with the gateway's CPU use."""
        before = _clock_ticks(self.pid)
        seconds = self.arguments.duration + 2
        load = asyncio.ensure_future(
            wrk(
                need("wrk"),
                self.url,
                self.script,
                self.arguments.connections,
                seconds,
                self.workdir / "wrk.log",
            )
        )
        try:
            await asyncio.sleep(0.5)
            output = await tool()
            loaded = await load
        finally:
            if not load.done():
                load.cancel()
        after = _clock_ticks(self.pid)
        ticks = os.sysconf("SC_CLK_TCK") * seconds
        return loaded, output, ((after[0] - before[0]) / ticks, (after[1] - before[1]) / ticks)

    def describe(self, loaded: WrkResult, cpu: tuple[float, float]) -> str:
        return (
            f"{loaded.rate:,.0f} req/s under `wrk -t2 -c{self.arguments.connections}` while sampled;"
            " the gateway"
            f" process used {100 * sum(cpu):.0f} % of a core ({100 * cpu[0]:.0f} % user,"
            f" {100 * cpu[1]:.0f} % system)."
        )

    async def py_spy(self) -> str:
        raw = self.workdir / "py-spy.raw"
        argv = [
            self.arguments.py_spy,
            "record",
            "--pid",
            str(self.pid),
            "--duration",
            str(self.arguments.duration),
            "--rate",
            str(self.arguments.rate),
            "--format",
            "raw",
            "--threads",
            "--native",
            "-o",
            str(raw),
        ]
        loaded, _, cpu = await self.under_load(lambda: _output(*argv))
        main = [line for line in raw.read_text().splitlines() if "MainThread" in line.split(";", 1)[0]]
        collapsed = self.arguments.stacks or self.workdir / "main-thread.collapsed"
        collapsed.write_text("\n".join(main) + "\n")
        return (
            f"## 1. py-spy: the event-loop thread, by wall clock when not sleeping\n\n"
            f"{self.describe(loaded, cpu)}\n\n{summarize_stacks(collapsed, self.arguments.top)}\n"
        )

    async def perf(self) -> str:
        data = self.workdir / "perf.data"
        argv = [
            "perf",
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "999",
            "-p",
            str(self.pid),
            "-o",
            str(data),
            "--",
            "sleep",
            str(self.arguments.duration),
        ]
        loaded, _, cpu = await self.under_load(lambda: _output(*argv))
        report = ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none"]
        by_dso = await _output(*report, "--sort", "dso")
        by_symbol = await _output(*report, "--sort", "dso,sym")
        return "\n".join(
            [
                "## 2. perf: the process's CPU time (cpu-clock, every thread)",
                "",
                self.describe(loaded, cpu),
                "",
                "By shared object:",
                "",
                *_perf_rows(by_dso, 12),
                "",
                "By symbol:",
                "",
                *_perf_rows(by_symbol, self.arguments.top),
                "",
            ]
        )

    async def strace(self) -> str:
        """Counts over one whole wrk run inside the trace, so calls divide by wrk's request count exactly."""
        summary = self.workdir / "strace.txt"
        tracer = await asyncio.create_subprocess_exec(
            "strace",
            "-c",
            "-f",
            "-p",
            str(self.pid),
            "-o",
            str(summary),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await asyncio.sleep(1.0)  # attached
            loaded = await wrk(
                need("wrk"),
                self.url,
                self.script,
                self.arguments.connections,
                self.arguments.duration,
                self.workdir / "wrk.log",
            )
            await asyncio.sleep(0.5)
        finally:
            if tracer.returncode is None:
                tracer.send_signal(signal.SIGINT)
                await tracer.wait()
        rows = ["| calls per request | syscall |", "|---:|---|"]
        for line in summary.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[0].replace(".", "").isdigit() and fields[-1] != "total":
                calls = int(fields[3])
                if calls / loaded.requests >= 0.01:
                    rows.append(f"| {calls / loaded.requests:.2f} | `{fields[-1]}` |")
        return "\n".join(
            [
                "## 3. strace -c: system calls per proxied request",
                "",
                (
                    f"{loaded.requests:,} requests at {loaded.rate:,.0f} req/s while traced"
                    " (strace slows every call; only"
                    " the counts matter here)."
                ),
                "",
                *rows,
                "",
            ]
        )


async def profile(workdir: Path, fleet: Fleet, arguments: argparse.Namespace) -> str:
    sink_port = await start_sink(fleet)
    upstream_port = free_port()
    (workdir / "files").mkdir()
    start_nginx(fleet, "nginx-upstream", upstream_server(upstream_port, sink_port, workdir / "files"))
    upstream = f"http://127.0.0.1:{upstream_port}"
    await wait_http(upstream + API_PATH, expect=200)
    gateway = await start_gateway_serve(fleet, upstream)
    token = await create_token(gateway)
    script = wrk_script(workdir, "gateway", f"Bearer {token.secret}")
    url = gateway.proxy + API_PATH
    await wrk(need("wrk"), url, script, arguments.connections, 5, workdir / "wrk.log")  # warm-up
    session = Session(workdir, fleet.pid(gateway.process), url, script, arguments)
    parts = [
        f"# Profile of `gateway serve` (one process) at c={arguments.connections}\n\n{arguments.source}.\n",
        await session.py_spy(),
    ]
    if shutil.which("perf"):
        parts.append(await session.perf())
    if shutil.which("strace"):
        parts.append(await session.strace())
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=15, help="seconds sampled by each tool (default 15)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    parser.add_argument("--ref", help="profile the gateway as committed at this ref, not the working tree")
    parser.add_argument(
        "--stacks", type=Path, help="also keep the collapsed py-spy stacks here (for a flame graph)"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "profile.md")
    arguments = parser.parse_args()
    arguments.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(arguments.py_spy).exists():
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-profile-"))
    gateway_path, exported = export_gateway(arguments.ref, workdir) if arguments.ref else (None, None)
    arguments.source = gateway_source(exported)
    fleet = Fleet(workdir, gateway_path=gateway_path)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        text = asyncio.run(until_signalled(profile(workdir, fleet, arguments)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("profile: interrupted; every process it started was stopped")
    finally:
        fleet.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(text)
    arguments.out.write_text(text)


if __name__ == "__main__":
    main()
