"""The results of a comparison run, and the Markdown report made of them (printed, written, in the README).

A cell of the main table is the median of a target's rounds at one concurrency, each figure on its own; the
targets of the issue are judged on those medians, all measured in the same run.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from cpu import CpuShare
from load import ColdWarm, StreamResult, WrkResult
from services import BENCH, need

REPO = BENCH.parent
README = BENCH / "README.md"
README_BEGIN, README_END = "<!-- latest-results:begin -->", "<!-- latest-results:end -->"
DIRECT, NGINX, NAIVE = "direct upstream", "nginx proxy", "naive aiohttp proxy"
GATEWAY, WORKERS = "gateway (1 worker)", "gateway (2 workers)"
# The 2 workers (with Redis) again, with a token limited to 100 000 requests a second: never refused, every
# request counted through Redis (the defaults: leases, gateway/ratelimits/leases.py).
LIMITED = "gateway (2 workers), limited token"
NGINX_TLS, GATEWAY_TLS = "nginx proxy, TLS", "gateway (1 worker), TLS"
# The gateway rows run with its defaults (the access log on, to a file); this one is the same with it off.
GATEWAY_LOG_OFF = "gateway (1 worker), log off"
CADDY = "Caddy basicauth + remote_ip"
FORWARD_AUTH = "nginx + auth_request to the gateway"
BODIES = ((1_000_000, "1 MB", 20), (50_000_000, "50 MB", 3))  # size, label, transfers
NOISY = 0.10  # other load, as a share of the machine, above which a run is flagged
# The loads each target is driven with: wrk at c=1 and c=32 wherever the scheduler puts the processes, and c=1
# with wrk, the target and the upstream kept on one core (a client's request and its answers then wait for no
# wake-up of another virtual CPU: what is measured is the software).
C1, C32, C1_ONE_CORE = "c=1", "c=32", "c=1, one core"


@dataclass(frozen=True)
class Run:
    wrk: WrkResult
    cpu: CpuShare


@dataclass(frozen=True)
class Cell:
    """The median of a target's runs at one concurrency (each figure on its own), and the worst other load."""

    rate: float
    p50_us: float
    p99_us: float
    cpu: float
    other: float

    @classmethod
    def of(cls, runs: list[Run]) -> Cell:
        def median(values: list[float]) -> float:
            return float(statistics.median(values))

        return cls(
            median([r.wrk.rate for r in runs]),
            median([r.wrk.p50_us for r in runs]),
            median([r.wrk.p99_us for r in runs]),
            median([r.cpu.target for r in runs]),
            max(r.cpu.other for r in runs),
        )


@dataclass
class Results:
    runs: dict[str, dict[str, list[Run]]] = field(default_factory=dict)  # target -> load -> runs
    streams: dict[tuple[str, str, str], StreamResult] = field(default_factory=dict)  # (body, direction, via)
    cold_warm: ColdWarm | None = None
    failures: dict[str, str] = field(default_factory=dict)  # target -> when and why it stopped answering

    def cell(self, target: str, load: str) -> Cell | None:
        runs = self.runs.get(target, {}).get(load)
        return Cell.of(runs) if runs else None

    def judged(self, target: str, load: str) -> Cell:
        """A cell the targets are judged on: measure_all fails the run rather than leave one out."""
        cell = self.cell(target, load)
        assert cell is not None, (target, load)
        return cell


def _us(value: float) -> str:
    return f"{value:,.0f} µs"


def _verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def _added(cell: Cell | None, direct: Cell | None) -> str:
    return "—" if cell is None or direct is None else f"{cell.p50_us - direct.p50_us:+,.0f} µs"


def wrk_table(results: Results) -> list[str]:
    lines = [
        (
            "| target | c=1 req/s | c=1 p50 | c=1 p99 | added p50 at c=1 | c=1 one core: p50 | added p50 "
            "| c=32 req/s | c=32 p50 | c=32 p99 | c=32 CPU per request | other load |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    direct = {load: results.cell(DIRECT, load) for load in (C1, C1_ONE_CORE)}
    for name in (*results.runs, *(name for name in results.failures if name not in results.runs)):
        one, pinned, many = (results.cell(name, load) for load in (C1, C1_ONE_CORE, C32))
        cells = ["—"] * 3 if one is None else [f"{one.rate:,.0f}", _us(one.p50_us), _us(one.p99_us)]
        baseline = {load: None if name == DIRECT else cell for load, cell in direct.items()}
        cells += [_added(one, baseline[C1]), "—" if pinned is None else _us(pinned.p50_us)]
        cells += [_added(pinned, baseline[C1_ONE_CORE])]
        cells += ["—"] * 3 if many is None else [f"{many.rate:,.0f}", _us(many.p50_us), _us(many.p99_us)]
        cpu = "—" if many is None else f"{_us(1e6 * many.cpu / many.rate)} ({many.cpu:.2f} cores)"
        measured = [cell for cell in (one, pinned, many) if cell is not None]
        other = max((cell.other for cell in measured), default=0.0)
        failed = " ✗" if name in results.failures else ""
        lines.append(
            f"| {name}{failed} | {' | '.join(cells)} | {cpu} | "
            f"{100 * other:.0f} %{' ⚠' if other > NOISY else ''} |"
        )
    for name, reason in results.failures.items():
        lines.append(f"\n✗ **{name} stopped answering** ({reason}); its later runs were skipped.")
    return lines


def target_lines(results: Results) -> list[str]:
    gateway, nginx, naive = (results.judged(name, C32) for name in (GATEWAY, NGINX, NAIVE))
    vs_nginx, vs_naive = gateway.rate / nginx.rate, gateway.rate / naive.rate
    added, pinned = (
        results.judged(GATEWAY, load).p50_us - results.judged(DIRECT, load).p50_us for load in (C1, C1_ONE_CORE)
    )
    lines = [
        f"- gateway (defaults: access log on)/nginx at c=32: **{vs_nginx:.2f}x** (target >= 0.35x:"
        f" {_verdict(vs_nginx >= 0.35)})",
        f"- gateway/naive at c=32: **{vs_naive:.2f}x** (target >= 2.5x: {_verdict(vs_naive >= 2.5)})",
        (
            f"- added p50 at c=1 over the direct upstream: **{_us(added)}** where the scheduler places the"
            f" processes (target <= 150 µs: {_verdict(added <= 150)}); **{_us(pinned)}** with all of them on"
            f" one core ({_verdict(pinned <= 150)})"
        ),
    ]
    big = [
        result for (label, _, via), result in results.streams.items() if label == "50 MB" and via == "gateway"
    ]
    if big and all(result.rss_growth_kib is not None for result in big):
        growth = max(result.rss_growth_kib or 0 for result in big) * 1024 / 1e6
        lines.append(
            f"- 50 MB body, gateway peak RSS growth (worse of down and up): **{growth:.1f} MB** "
            f"(target < 30 MB: {_verdict(growth < 30)})"
        )
    log_off, caddy = results.cell(GATEWAY_LOG_OFF, C32), results.cell(CADDY, C32)
    if log_off is not None:
        cost = 1 - gateway.rate / log_off.rate
        lines.append(
            f"- throughput lost to the access log (defaults against log off) at c=32: **{100 * cost:.1f} %**"
            f" (target <= 10 %: {_verdict(cost <= 0.10)})"
        )
    if caddy is not None:
        vs_caddy = gateway.rate / caddy.rate
        lines.append(
            f"- gateway (defaults)/Caddy with basicauth and remote_ip at c=32: **{vs_caddy:.2f}x**"
            f" (target >= 1.5x: {_verdict(vs_caddy >= 1.5)})"
        )
    asked = results.cell(FORWARD_AUTH, C1)
    if asked is not None:
        # The target: asking the gateway adds no more to the operator's nginx than the gateway as the proxy
        # adds to the direct upstream.
        direct, proxied = results.judged(DIRECT, C1).p50_us, results.judged(GATEWAY, C1).p50_us
        through = asked.p50_us - results.judged(NGINX, C1).p50_us
        lines.append(
            f"- nginx + auth_request to the gateway, added p50 at c=1 over nginx alone: **{_us(through)}**,"
            f" against the gateway as the proxy's {_us(proxied - direct)} over the direct upstream (target: no"
            f" more: {_verdict(through <= proxied - direct)})"
        )
        many = results.cell(FORWARD_AUTH, C32)
        if many is not None:
            lines.append(
                f"- for information, nginx + auth_request at c=32: {many.rate / nginx.rate:.2f}x nginx alone,"
                f" {many.rate / gateway.rate:.2f}x the gateway as the proxy"
            )
    two = results.cell(WORKERS, C32)
    if two is not None:
        lines.append(
            f"- for information, 2 workers at c=32: {two.rate / nginx.rate:.2f}x nginx, "
            f"{two.rate / naive.rate:.2f}x naive, {two.rate / gateway.rate:.2f}x one worker"
        )
    limited = results.cell(LIMITED, C32)
    if two is not None and limited is not None:
        cost = 1 - limited.rate / two.rate
        lines.append(
            f"- a limited token (rate_limit 100000/1 s, counted in Redis) against an unlimited one, 2 workers at"
            f" c=32: **{100 * cost:.1f} %** fewer requests per second (target <= 15 %: {_verdict(cost <= 0.15)})"
        )
    noisy = sum(run.cpu.other > NOISY for by in results.runs.values() for runs in by.values() for run in runs)
    if noisy:
        lines.append(
            f"- ⚠ {noisy} run(s) shared the machine with other processes using more than "
            f"{100 * NOISY:.0f} % of it: treat those figures with care, or rerun on a quiet machine"
        )
    return lines


def stream_table(results: Results) -> list[str]:
    lines = [
        "| body | direction | direct MB/s | gateway MB/s | gateway peak RSS growth |",
        "|---|---|---:|---:|---:|",
    ]
    for _, label, transfers in BODIES:
        for direction in ("download", "upload"):
            direct, through = (
                results.streams[(label, direction, "direct")],
                results.streams[(label, direction, "gateway")],
            )
            growth = "?" if through.rss_growth_kib is None else f"{through.rss_growth_kib / 1024:.1f} MiB"
            lines.append(
                f"| {label} (x{transfers}) | {direction} | {direct.mb_per_s:,.0f} | {through.mb_per_s:,.0f} "
                f"| {growth} |"
            )
    return lines


def cold_warm_lines(cold_warm: ColdWarm) -> list[str]:
    cold, warm = statistics.median(cold_warm.cold_ms), statistics.median(cold_warm.warm_ms)
    ordered = sorted(cold_warm.cold_ms)
    return [
        (
            "- cold token (its first request in this process: argon2id verify in the executor):"
            f" median **{cold:.2f} ms** (min {ordered[0]:.2f}, max {ordered[-1]:.2f};"
            f" {len(ordered)} fresh tokens)"
        ),
        f"- warm token (the memo digest): median **{warm:.3f} ms** ({len(cold_warm.warm_ms)} requests)",
        f"- a cold token costs about **{cold - warm:.1f} ms** more, once per token per process",
    ]


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (
        ((done.stdout or "") + (done.stderr or "")).strip().splitlines()[0]
        if (done.stdout or done.stderr)
        else "?"
    )


def gateway_source(exported: str | None) -> str:
    """Which gateway was measured: an exported commit, or the working tree (and whether it had edits)."""
    if exported is not None:
        return f"gateway at commit {exported} (exported with --ref)"
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway", "admin_api"])
    return f"gateway from the working tree at {commit}" + (
        " with uncommitted changes" if dirty not in ("", "?") else ""
    )


def machine(load_before: str, load_after: str, source: str) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    memory = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    return (
        f"Machine: {model}, {os.cpu_count()} cores, {memory / 1024 / 1024:.1f} GiB, "
        f"Linux {platform.release()}; "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"{_first_line([need('nginx'), '-v']).replace('nginx version: ', '')}, "
        f"{_first_line([need('wrk'), '-v']).split(' [')[0]}; {source}; "
        f"load average {load_before} before, "
        f"{load_after} after; {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}."
    )


def report(results: Results, *, rounds: int, duration: float, warmup: float, machine_line: str) -> str:
    parts = [
        "### Throughput and latency (wrk, ~100 B JSON answered by nginx)",
        "",
        (
            f"Each cell is the median of {rounds} run(s) of {duration:g} s, each after"
            f" a {warmup:g} s warm-up, the targets taken in turn round after round; c=1 is"
            " `wrk -t1 -c1`, c=32 is `wrk -t2 -c32`; nginx runs one worker; latencies are wrk's percentiles."
            " *c=1, one core*: the same c=1 run with wrk, the target and the upstream nginx kept on one core"
            " (their threads' CPU affinity), so that no hop waits for another virtual CPU to wake up; *added*:"
            " the p50 over the direct upstream's under the same placement."
            " *c=32 CPU per request*: CPU time of the target's own processes (not the upstream's, not wrk's)"
            " per request at c=32, and the cores they kept busy; *other load*: the largest share of the"
            " machine that processes not started by the benchmark used during one of the target's runs"
            " (see bench/README.md)."
        ),
        "",
        *wrk_table(results),
        "",
        "Targets (single worker, same run):",
        "",
        *target_lines(results),
        "",
        "### Bodies streamed through the single-process gateway",
        "",
        (
            "Download: nginx serves the file; upload: nginx streams it to bench/sink.py, which counts every"
            " byte. MB/s is the median over the transfers; RSS growth is the gateway's peak RSS (VmHWM,"
            " reset before) over its RSS before the transfers."
        ),
        "",
        *stream_table(results),
        "",
        "### A token's first request against the next ones (single-process gateway)",
        "",
        *(cold_warm_lines(results.cold_warm) if results.cold_warm else []),
        "",
        machine_line,
        "",
    ]
    return "\n".join(parts)


def refresh_readme(text: str) -> None:
    if not README.exists():
        return
    current = README.read_text()
    begin, end = current.find(README_BEGIN), current.find(README_END)
    if begin < 0 or end < begin:
        return
    README.write_text(current[: begin + len(README_BEGIN)] + "\n" + text + current[end:])
