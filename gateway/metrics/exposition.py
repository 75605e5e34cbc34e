"""The Prometheus text format (version 0.0.4) of one process's metrics, rendered at scrape time.

Counters and histograms come from counters.Metrics and from the counts the components keep anyway (token
cache, Redis, store, argon2); reachability and undelivered changes are checked when scraped. Labels carry
decision codes, status classes, layers and (only when enabled) token ids: never a secret.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable

from gateway import __version__
from gateway.core import Core
from gateway.health import readiness
from gateway.metrics.counters import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNDELIVERED_LIMIT = 10_000  # counted up to this many; a larger backlog shows as this number


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{name}="{_escape(value)}"' for name, value in pairs)
    return "{" + inner + "}" if inner else ""


def _status_class(status_class: int) -> str:
    return f"{status_class}xx" if status_class else "none"


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += (f"# HELP {name} {help_text}", f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: Iterable[tuple[str, str]] = ()) -> None:
        self.lines.append(
            f"{name}{_labels(labels)} {value:g}"
            if isinstance(value, float)
            else f"{name}{_labels(labels)} {value}"
        )

    def histogram(self, name: str, help_text: str, histogram: Histogram) -> None:
        self.family(name, "histogram", help_text)
        cumulative = 0
        for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
            cumulative += count
            self.sample(f"{name}_bucket", cumulative, [("le", repr(bound))])
        cumulative += histogram.counts[-1]
        self.sample(f"{name}_bucket", cumulative, [("le", "+Inf")])
        self.lines.append(f"{name}_sum {histogram.sum!r}")
        self.sample(f"{name}_count", cumulative)


async def render(core: Core) -> str:
    metrics = core.metrics
    text = _Text()
    text.family("gateway_build_info", "gauge", "The gateway's version and Python's, always 1.")
    text.sample("gateway_build_info", 1, [("version", __version__), ("python", platform.python_version())])

    text.family(
        "gateway_requests_total",
        "counter",
        "Requests answered on the proxy port, by decision code and status class.",
    )
    for (code, status_class), count in sorted(metrics.requests.items()):
        text.sample(
            "gateway_requests_total", count, [("code", code), ("status_class", _status_class(status_class))]
        )
    if metrics.by_token is not None:
        text.family(
            "gateway_token_requests_total", "counter", "Requests answered per token id and status class."
        )
        for (token_id, status_class), count in sorted(metrics.by_token.items()):
            text.sample(
                "gateway_token_requests_total",
                count,
                [("token_id", token_id), ("status_class", _status_class(status_class))],
            )
    text.histogram(
        "gateway_request_gateway_seconds",
        "Time each request spent in the gateway itself: from its head to its answer, less the upstream's wait.",
        metrics.gateway_seconds,
    )
    text.histogram(
        "gateway_request_upstream_seconds",
        "Time from sending a request upstream to the upstream's response head.",
        metrics.upstream_seconds,
    )

    cache = core.tokens
    lookups = [("process", "hit", cache.hits), ("process", "miss", cache.misses)]
    if core.shared is not None:
        shared = core.shared.tokens
        misses = shared.redis_reads - shared.redis_hits
        lookups += [
            ("redis", "hit", shared.redis_hits),
            ("redis", "miss", misses),
            ("redis", "error", shared.redis_errors),
            ("store", "hit", shared.store_found),
            ("store", "miss", shared.store_missing),
        ]
    else:
        lookups += [("store", "hit", cache.source_found), ("store", "miss", cache.source_missing)]
    text.family(
        "gateway_token_lookups_total",
        "counter",
        "Token lookups per cache layer: hit (an entry, or a known unknown id), miss (asked the next layer), error.",
    )
    for layer, result, count in lookups:
        text.sample("gateway_token_lookups_total", count, [("layer", layer), ("result", result)])

    text.family(
        "gateway_argon2_verifications_total", "counter", "argon2id verifications run by this process."
    )
    text.sample("gateway_argon2_verifications_total", core.hasher.verify_calls)
    text.family("gateway_store_token_reads_total", "counter", "Token reads from the store by this process.")
    text.sample("gateway_store_token_reads_total", core.store.reads)

    ready, checks = await readiness(core)
    text.family(
        "gateway_dependency_up", "gauge", "Whether the store and Redis (when configured) answer: 1 or 0."
    )
    text.sample("gateway_dependency_up", int(checks["store"] == "ok"), [("dependency", "store")])
    if core.shared is not None:
        text.sample("gateway_dependency_up", int(checks["redis"] == "ok"), [("dependency", "redis")])
    limiter = core.limiter
    text.family(
        "gateway_rate_limit_per_process",
        "gauge",
        "1 while rate limits and quotas are counted by this process alone because Redis does not answer.",
    )
    text.sample("gateway_rate_limit_per_process", int(limiter.shared is not None and limiter.shared.degraded))
    if limiter.shared is not None:
        text.family(
            "gateway_rate_limit_checks_total",
            "counter",
            "Checks of limited tokens: counted in Redis, or by this process while Redis did not answer.",
        )
        text.sample("gateway_rate_limit_checks_total", limiter.shared.redis_checks, [("counted", "redis")])
        text.sample("gateway_rate_limit_checks_total", limiter.shared.fallback_checks, [("counted", "process")])
        text.sample("gateway_rate_limit_checks_total", limiter.shared.leased_checks, [("counted", "lease")])
    undelivered = 0
    if core.shared is not None and checks["store"] == "ok":
        undelivered = len(await core.store.pending_changes(limit=UNDELIVERED_LIMIT))
    text.family("gateway_undelivered_changes", "gauge", "Committed token changes not yet delivered to Redis.")
    text.sample("gateway_undelivered_changes", undelivered)
    text.histogram(
        "gateway_change_propagation_seconds",
        "From a token change's commit to this process hearing of it on the Redis channel (clocks of both hosts).",
        metrics.propagation_seconds,
    )

    text.family("gateway_client_connections", "gauge", "Client connections open on the proxy port.")
    text.sample("gateway_client_connections", metrics.gauges.get("client_connections", lambda: 0)())
    text.family("gateway_upstream_connections", "gauge", "Connections open to the upstream, idle or in use.")
    text.sample("gateway_upstream_connections", metrics.gauges.get("upstream_connections", lambda: 0)())
    return "\n".join(text.lines) + "\n"
