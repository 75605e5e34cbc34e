"""The measurements: wrk runs, bodies streamed through, and the first request of a token against the next.

Each wrk run is preceded by a warm-up run against the same target (connections, caches, the allocator, the
argon2 memo), whose figures are thrown away. Latencies are wrk's own percentiles, parsed from `--latency`.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from services import reset_peak_rss, rss_kib

_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}
_LATENCY = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True)
class WrkResult:
    rate: float  # requests per second
    p50_us: float
    p99_us: float
    requests: int


def parse_wrk(output: str) -> WrkResult:
    """wrk's text report, `--latency` included. Any non-2xx answer or socket error makes the run invalid."""
    latencies = {int(level): float(value) * _UNITS[unit] for level, value, unit in _LATENCY.findall(output)}
    rate, total = _RATE.search(output), _TOTAL.search(output)
    if rate is None or total is None or set(latencies) != {50, 99}:
        raise RuntimeError(f"cannot parse wrk's output:\n{output}")
    failures = [] if int(total.group(1)) > 0 else ["no request completed"]
    if (non_2xx := _NON_2XX.search(output)) is not None:
        failures.append(f"{non_2xx.group(1)} non-2xx answers")
    if (errors := _SOCKET_ERRORS.search(output)) is not None and any(int(n) for n in errors.groups()):
        failures.append(errors.group(0))
    if failures:
        raise RuntimeError(f"wrk run is invalid ({'; '.join(failures)}):\n{output}")
    return WrkResult(float(rate.group(1)), latencies[50], latencies[99], int(total.group(1)))


def wrk_script(workdir: Path, name: str, authorization: str) -> Path:
    path = workdir / f"{name}.lua"
    path.write_text(f'wrk.method = "GET"\nwrk.headers["Authorization"] = "{authorization}"\n')
    return path


async def wrk(
    wrk_binary: str, url: str, script: Path, connections: int, seconds: float, log: Path, *, cpu: int | None = None
) -> WrkResult:
    """`cpu`: run wrk on that core only (for the one-core latency runs)."""
    threads = 1 if connections == 1 else 2
    argv = [
        wrk_binary,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=None if cpu is None else lambda: os.sched_setaffinity(0, {cpu}),
    )
    try:
        output = (await process.communicate())[0].decode(errors="replace")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    with log.open("a") as file:
        file.write(f"$ {' '.join(argv)}\n{output}\n")
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{output}")
    return parse_wrk(output)


async def measure_wrk(
    wrk_binary: str, url: str, script: Path, connections: int, *, seconds: float, warmup: float, log: Path
) -> WrkResult:
    if warmup > 0:
        await wrk(wrk_binary, url, script, connections, warmup, log)
    return await wrk(wrk_binary, url, script, connections, seconds, log)


# --- bodies streamed through ------------------------------------------------------------------------------


WARM_SIZE = 1_000_000


@dataclass(frozen=True)
class StreamResult:
    mb_per_s: float  # median over the transfers
    rss_growth_kib: int | None  # peak RSS of the watched process during the transfers, over its RSS before


async def _chunks(size: int, block: bytes) -> AsyncIterator[bytes]:
    sent = 0
    while sent < size:
        piece = block[: min(len(block), size - sent)]
        sent += len(piece)
        yield piece


async def _one_transfer(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], size: int, upload: bool, block: bytes
) -> float:
    started = time.perf_counter()
    if upload:
        async with session.post(
            url,
            data=_chunks(size, block),
            headers={**headers, "Content-Length": str(size), "Content-Type": "application/octet-stream"},
        ) as response:
            answer = await response.json(content_type=None)
            if response.status != 200 or answer.get("bytes") != size:
                raise RuntimeError(f"upload of {size} B to {url}: {response.status} {answer}")
    else:
        received = 0
        async with session.get(url, headers=headers) as response:
            async for chunk in response.content.iter_any():
                received += len(chunk)
            if response.status != 200 or received != size:
                raise RuntimeError(f"download of {size} B from {url}: {response.status}, {received} B")
    return time.perf_counter() - started


async def measure_stream(
    url: str,
    authorization: str,
    size: int,
    *,
    upload: bool,
    transfers: int,
    watch_pid: int | None,
    warm_url: str | None = None,
) -> StreamResult:
    """Throughput of `transfers` sequential bodies, and the watched process's peak RSS growth meanwhile.

    A first, unmeasured transfer of WARM_SIZE bytes (from `warm_url` for downloads) opens the connection. The
    peak is VmHWM after resetting it (clear_refs) before that first transfer, so it is these transfers' own
    peak, not the wrk runs'; where the reset is refused, VmRSS sampled every 10 ms stands in.
    """
    headers = {"Authorization": authorization}
    block = bytes(1024 * 1024)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1), auto_decompress=False
    ) as session:
        baseline = peak = None
        exact = False
        if watch_pid is not None:
            exact = reset_peak_rss(watch_pid)
            baseline = peak = rss_kib(watch_pid)
        sampling = True
        await _one_transfer(session, warm_url or url, headers, WARM_SIZE, upload, block)  # connect, warm up

        async def sample() -> None:
            nonlocal peak
            while sampling and watch_pid is not None:
                peak = max(peak or 0, rss_kib(watch_pid))
                await asyncio.sleep(0.01)

        sampler = asyncio.ensure_future(sample())
        try:
            durations = [
                await _one_transfer(session, url, headers, size, upload, block) for _ in range(transfers)
            ]
        finally:
            sampling = False
            await sampler
    growth = None
    if watch_pid is not None and baseline is not None:
        top = max(peak or 0, rss_kib(watch_pid, "VmHWM")) if exact else (peak or baseline)
        growth = top - baseline
    return StreamResult(size / 1e6 / statistics.median(durations), growth)


# --- the first request of a token against the next ----------------------------------------------------


@dataclass(frozen=True)
class ColdWarm:
    cold_ms: list[float]
    warm_ms: list[float]


async def measure_cold_warm(
    url: str, tokens: list[str], warm_token: str, *, warm_requests: int = 5
) -> ColdWarm:
    """For each never-used token: the first request (argon2) and then `warm_requests` more (the memo digest).

    One kept-alive connection, opened beforehand with a token already warm, so no connect is timed.
    """
    cold: list[float] = []
    warm: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:

        async def timed(token: str) -> float:
            started = time.perf_counter()
            async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: {response.status} {await response.text()}")
            return (time.perf_counter() - started) * 1000

        for _ in range(20):
            await timed(warm_token)
        for token in tokens:
            cold.append(await timed(token))
            warm.extend([await timed(token) for _ in range(warm_requests)])
    return ColdWarm(cold, warm)
