"""How much does the gateway cost, next to nginx and to the aiohttp proxy anyone would write first?

On loopback, with an nginx upstream answering ~100 bytes of JSON, it drives in turn: the upstream directly,
nginx as a keep-alive reverse proxy, the naive aiohttp proxy of naive_proxy.py (a dict lookup for the token:
the floor), the gateway (`gateway serve`, one process, a real token: argon2 hash in the store, IP range and
access level checked), nginx and that gateway again with TLS on their client port (a self-signed P-256
certificate; wrk keeps its connections, so handshakes are few and the rows show the cost of encryption), and
`gateway proxy --workers 2` (with redis and a `gateway admin`), and nginx asking the gateway's forward-auth
port before each request (`auth_request`, the README's configuration). Each with wrk at
concurrency 1 (-t1 -c1) and 32 (-t2 -c32), after a warm-up run, round after round. Then, through the
single-process gateway: a 1 MB and a 50 MB body, down and up (throughput and the gateway's peak RSS growth),
and the first request of a fresh token (argon2) against the next ones.

    bench/run [--duration 10] [--warmup 3] [--rounds 3] [--quiet-wait 60] [--out bench/results/latest.md]
              [--no-readme] [--keep]

Run by hand (it is not a test). It prints a Markdown report, writes it to --out and, unless --no-readme,
refreshes the copy in bench/README.md. wrk and the servers share the machine's cores: that is the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cpu import CpuMeter
from load import WARM_SIZE, measure_cold_warm, measure_stream, wrk, wrk_script
from report import (
    BODIES,
    C1,
    C1_ONE_CORE,
    C32,
    CADDY,
    DIRECT,
    FORWARD_AUTH,
    GATEWAY,
    GATEWAY_LOG_OFF,
    GATEWAY_TLS,
    LIMITED,
    NAIVE,
    NGINX,
    NGINX_TLS,
    NOISY,
    WORKERS,
    Results,
    Run,
    gateway_source,
    machine,
    refresh_readme,
    report,
)
from services import (
    API_PATH,
    BENCH,
    DOWNLOAD_PREFIX,
    UPLOAD_PATH,
    UPSTREAM_BODY,
    Fleet,
    Gateway,
    create_token,
    export_gateway,
    forward_auth_server,
    free_port,
    make_certificate,
    need,
    on_one_core,
    proxy_server,
    start_caddy,
    start_gateway_serve,
    start_gateway_workers,
    start_naive,
    start_nginx,
    start_sink,
    until_signalled,
    upstream_server,
    wait_http,
)

LOADS = ((C1, 1, False), (C32, 32, False), (C1_ONE_CORE, 1, True))  # label, connections, on one core
ONE_CORE = 0  # the core of the one-core runs
COLD_TOKENS = 20
NAIVE_TOKEN = "token"  # naive_proxy.TOKENS


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    authorization: str
    processes: list[str]  # fleet names whose CPU is the target's


@dataclass(frozen=True)
class Options:
    duration: float
    warmup: float
    rounds: int
    quiet_wait: float
    workdir: Path


async def check_target(target: Target) -> None:
    """Before measuring: the target answers 200 with the upstream's body, so wrk counts real responses."""
    headers = {"Authorization": target.authorization}
    async with (
        aiohttp.ClientSession() as session,
        session.get(target.url, headers=headers, ssl=False) as response,  # the run's self-signed certificate
    ):
        body = await response.text()
        if response.status != 200 or body != UPSTREAM_BODY:
            raise RuntimeError(f"{target.name}: {target.url} answered {response.status}: {body[:300]}")


async def wait_for_quiet(fleet: Fleet, patience: float) -> None:
    """On a shared machine, wait (up to `patience` seconds) until others leave it for a whole second."""
    deadline, waited = time.monotonic() + patience, False
    while time.monotonic() < deadline:
        meter = CpuMeter([], fleet.groups())
        await asyncio.sleep(1.0)
        if (other := meter.stop().other) <= NOISY / 2:
            break
        if not waited:
            print(
                f"  waiting for the machine to quieten (other processes use {100 * other:.0f} % of it)",
                flush=True,
            )
            waited = True


async def drive(
    results: Results, fleet: Fleet, options: Options, target: Target, load: str, connections: int, one_core: bool
) -> None:
    script = wrk_script(options.workdir, target.name.split()[0], target.authorization)
    binary, log = need("wrk"), options.workdir / "wrk.log"
    cpu_for_wrk = ONE_CORE if one_core else None
    await wait_for_quiet(fleet, options.quiet_wait)
    chain = fleet.threads([*target.processes, "nginx-upstream"]) if one_core else []
    with on_one_core(chain, ONE_CORE):
        if options.warmup > 0:
            await wrk(binary, target.url, script, connections, options.warmup, log, cpu=cpu_for_wrk)
        meter = CpuMeter(fleet.groups(target.processes), fleet.groups())
        result = await wrk(binary, target.url, script, connections, options.duration, log, cpu=cpu_for_wrk)
        cpu = meter.stop()
    results.runs.setdefault(target.name, {}).setdefault(load, []).append(Run(result, cpu))
    flag = f"  other load {100 * cpu.other:.0f} %" + (" (noisy)" if cpu.other > NOISY else "")
    print(
        f"  {target.name:<20} {load:<13} {result.rate:>9,.0f} req/s  p50 {result.p50_us:>7,.0f} µs  "
        f"p99 {result.p99_us:>7,.0f} µs  CPU {cpu.target:.2f}{flag}",
        flush=True,
    )


async def busy_while_failing(fleet: Fleet, target: Target) -> str:
    """A target that answers nothing: idle (waiting on something) or spinning (a loop that never yields)?"""
    meter = CpuMeter(fleet.groups(target.processes), fleet.groups())
    await asyncio.sleep(2.0)
    cores = meter.stop().target
    spinning = " (spinning)" if cores > 0.5 else ""
    states = ", ".join(fleet.describe(name) for name in target.processes)
    return f"; then {states}, keeping {cores:.2f} cores busy{spinning}"


async def start_targets(fleet: Fleet, workdir: Path) -> tuple[list[Target], str, Gateway]:
    """Everything, started once and left running (idle) while the others are measured."""
    files = workdir / "files"
    files.mkdir()
    for size in {WARM_SIZE, *(size for size, _, _ in BODIES)}:
        with (files / f"{size}.bin").open("wb") as file:
            file.truncate(size)  # zeros; nginx sends them with sendfile like any file
    sink_port = await start_sink(fleet)
    upstream_port, proxy_port, tls_proxy_port = free_port(), free_port(), free_port()
    tls = make_certificate(workdir)
    start_nginx(fleet, "nginx-upstream", upstream_server(upstream_port, sink_port, files))
    start_nginx(fleet, "nginx-proxy", proxy_server(proxy_port, upstream_port))
    start_nginx(fleet, "nginx-proxy-tls", proxy_server(tls_proxy_port, upstream_port, tls))
    upstream = f"http://127.0.0.1:{upstream_port}"
    await wait_http(upstream + API_PATH, expect=200)
    await wait_http(f"http://127.0.0.1:{proxy_port}{API_PATH}", expect=200)
    await wait_http(f"https://127.0.0.1:{tls_proxy_port}{API_PATH}", expect=200)
    naive = await start_naive(fleet, upstream)
    single = await start_gateway_serve(fleet, upstream)
    log_off = await start_gateway_serve(fleet, upstream, name="gateway-serve-log-off", access_log=False)
    caddy_port = free_port()
    caddy_authorization = start_caddy(fleet, caddy_port, upstream_port)
    await wait_http(f"http://127.0.0.1:{caddy_port}{API_PATH}", expect=401)
    single_tls = await start_gateway_serve(fleet, upstream, name="gateway-serve-tls", tls=tls)
    workers = await start_gateway_workers(fleet, upstream, 2)
    auth_port, auth_proxy_port = free_port(), free_port()
    asked = await start_gateway_serve(fleet, upstream, name="gateway-forward-auth", forward_auth_port=auth_port)
    start_nginx(fleet, "nginx-forward-auth", forward_auth_server(auth_proxy_port, auth_port, upstream_port))
    await wait_http(f"http://127.0.0.1:{auth_proxy_port}{API_PATH}", expect=401)
    plain = f"Bearer {NAIVE_TOKEN}"
    targets = [
        Target(DIRECT, upstream + API_PATH, plain, ["nginx-upstream"]),
        Target(NGINX, f"http://127.0.0.1:{proxy_port}{API_PATH}", plain, ["nginx-proxy"]),
        Target(NAIVE, naive + API_PATH, plain, ["naive-proxy"]),
        Target(
            GATEWAY,
            single.proxy + API_PATH,
            f"Bearer {(await create_token(single)).secret}",
            [single.process],
        ),
        Target(
            GATEWAY_LOG_OFF,
            log_off.proxy + API_PATH,
            f"Bearer {(await create_token(log_off)).secret}",
            [log_off.process],
        ),
        Target(CADDY, f"http://127.0.0.1:{caddy_port}{API_PATH}", caddy_authorization, ["caddy"]),
        Target(NGINX_TLS, f"https://127.0.0.1:{tls_proxy_port}{API_PATH}", plain, ["nginx-proxy-tls"]),
        Target(
            GATEWAY_TLS,
            single_tls.proxy + API_PATH,
            f"Bearer {(await create_token(single_tls)).secret}",
            [single_tls.process],
        ),
        Target(
            FORWARD_AUTH,
            f"http://127.0.0.1:{auth_proxy_port}{API_PATH}",
            f"Bearer {(await create_token(asked)).secret}",
            ["nginx-forward-auth", asked.process],
        ),
        Target(
            WORKERS,
            workers.proxy + API_PATH,
            f"Bearer {(await create_token(workers)).secret}",
            [workers.process],
        ),
        Target(
            LIMITED,
            workers.proxy + API_PATH,
            f"Bearer {(await create_token(workers, rate_limit={'requests': 100_000, 'per_seconds': 1})).secret}",
            [workers.process],
        ),
    ]
    for target in targets:
        await check_target(target)
    return targets, upstream, single


async def measure_all(fleet: Fleet, options: Options) -> Results:
    results = Results()
    print(
        "starting nginx (upstream and proxy), the naive proxy, the gateway (1 process; 2 workers + admin"
        " + redis)",
        flush=True,
    )
    targets, upstream, gateway = await start_targets(fleet, options.workdir)
    for round_number in range(1, options.rounds + 1):
        print(f"round {round_number} of {options.rounds}", flush=True)
        for target in targets:
            for load, connections, one_core in LOADS:
                if target.name in results.failures:
                    continue
                try:
                    await drive(results, fleet, options, target, load, connections, one_core)
                except RuntimeError as error:
                    # One broken target must not cost the others' figures: record it, stop it (it may be
                    # spinning on a core), go on.
                    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                    reason = lines[0].rstrip(":") + (
                        f" ({lines[1]})" if len(lines) > 1 and "wrk failed" in lines[0] else ""
                    )
                    reason += await busy_while_failing(fleet, target)
                    results.failures[target.name] = f"round {round_number}, {load}: {reason}"
                    print(f"  {target.name:<20} {load:<13} FAILED: {reason}", flush=True)
                    for name in target.processes:
                        print(fleet.log_tail(name, 5), flush=True)
                        fleet.stop(name)
    if any(name in results.failures for name in (DIRECT, NGINX, NAIVE, GATEWAY)):
        raise RuntimeError(f"a target the targets are judged on failed: {results.failures}")
    print("bodies streamed through the gateway (1 process)", flush=True)
    await measure_streams(results, fleet, gateway, upstream)
    print("cold and warm tokens", flush=True)
    cold = [await create_token(gateway) for _ in range(COLD_TOKENS)]
    warm = next(target for target in targets if target.name == GATEWAY).authorization.split()[1]
    results.cold_warm = await measure_cold_warm(gateway.proxy + API_PATH, [t.secret for t in cold], warm)
    print(
        f"  cold token {statistics.median(results.cold_warm.cold_ms):.2f} ms, "
        f"warm {statistics.median(results.cold_warm.warm_ms):.3f} ms (medians)",
        flush=True,
    )
    return results


async def measure_streams(results: Results, fleet: Fleet, gateway: Gateway, upstream: str) -> None:
    uploader = await create_token(gateway, "editorial")  # read_only may not POST
    pid = fleet.pid(gateway.process)
    for size, label, transfers in BODIES:
        for direction, upload in (("download", False), ("upload", True)):
            path = UPLOAD_PATH if upload else f"{DOWNLOAD_PREFIX}{size}.bin"
            for via, base, watch in (("direct", upstream, None), ("gateway", gateway.proxy, pid)):
                results.streams[(label, direction, via)] = await measure_stream(
                    base + path,
                    f"Bearer {uploader.secret}",
                    size,
                    upload=upload,
                    transfers=transfers,
                    watch_pid=watch,
                    warm_url=None if upload else f"{base}{DOWNLOAD_PREFIX}{WARM_SIZE}.bin",
                )
            direct, through = (
                results.streams[(label, direction, "direct")],
                results.streams[(label, direction, "gateway")],
            )
            print(
                f"  {label:>5} {direction:<8} direct {direct.mb_per_s:7,.0f} MB/s"
                f"  gateway {through.mb_per_s:7,.0f} MB/s"
                f"  peak RSS +{(through.rss_growth_kib or 0) / 1024:.1f} MiB",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=10, help="seconds of each measured wrk run (default 10)"
    )
    parser.add_argument(
        "--warmup", type=float, default=3, help="seconds of the warm-up run before each (default 3)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs per target and concurrency (default 3)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="before each run, wait up to this many seconds for other processes to leave the"
        " machine (default 60; 0: never wait)",
    )
    parser.add_argument(
        "--ref",
        help="measure the gateway as committed at this git ref (e.g. HEAD), not the working tree",
    )
    parser.add_argument(
        "--out", default=str(BENCH / "results" / "latest.md"), help="where the report is written"
    )
    parser.add_argument(
        "--no-readme", action="store_true", help="do not refresh the table in bench/README.md"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (configs, logs, wrk output)"
    )
    arguments = parser.parse_args()
    for program in ("nginx", "wrk", "redis-server", "caddy"):
        need(program)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    gateway_path, exported = export_gateway(arguments.ref, workdir) if arguments.ref else (None, None)
    fleet = Fleet(workdir, gateway_path=gateway_path)
    options = Options(arguments.duration, arguments.warmup, arguments.rounds, arguments.quiet_wait, workdir)
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    started = time.monotonic()
    try:
        results = asyncio.run(until_signalled(measure_all(fleet, options)))
    except RuntimeError as error:
        print(f"bench: {error}", file=sys.stderr)
        print(f"bench: logs are in {workdir}", file=sys.stderr)
        arguments.keep = True
        raise SystemExit(1) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; stopping every process it started", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        fleet.stop_all()
        if not arguments.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    text = report(
        results,
        rounds=options.rounds,
        duration=options.duration,
        warmup=options.warmup,
        machine_line=machine(load_before, load_after, gateway_source(exported)),
    )
    print()
    print(text)
    out = Path(arguments.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if not arguments.no_readme and out.resolve() == (BENCH / "results" / "latest.md").resolve():
        refresh_readme(text)
    print(
        f"written to {out} in {time.monotonic() - started:.0f} s"
        + (f"; work directory {workdir}" if arguments.keep else "")
    )


if __name__ == "__main__":
    main()
