"""The numbers each process keeps for /metrics: plain ints and lists, incremented where things happen.

prometheus_client would cost about 3.5 us per request here (a labelled Counter.inc, an unlabelled one and two
Histogram.observe, measured with timeit: 1.0 us for `labels().inc()`, 0.6 us per observe) and 6.3 us in its
multi-process mode, 10-18 % of the gateway's 36 us per request; these cost 0.5 us together (1.4 %). They are rendered in the
Prometheus text format only when scraped (exposition.py). Each process has its own: `gateway proxy --workers N`
serves one endpoint per worker (see listener.py).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence

# Seconds. The gateway's own time is tens of microseconds; the upstream's and a change's propagation are longer.
GATEWAY_BUCKETS = (0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)
UPSTREAM_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
PROPAGATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)


class Histogram:
    """Counts per bucket (`le` bounds, the last one +Inf) and the sum, as Prometheus histograms have them."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class Metrics:
    """One process's request counters and histograms, and the gauges components register for scrape time.

    `requests` maps (decision code, status // 100) to a count: "ok" for a request the upstream answered,
    else the problem's `code`. `by_token` maps (token id, status // 100) to a count, only when per-token
    labels are enabled (one series per token: mind the cardinality)."""

    __slots__ = (
        "_by_code",
        "by_token",
        "gateway_seconds",
        "gauges",
        "propagation_seconds",
        "upstream_seconds",
    )

    def __init__(self, *, token_labels: bool = False) -> None:
        # Decision code -> counts by status class (index status // 100): no key to build per request.
        self._by_code: dict[str, list[int]] = {}
        self.by_token: dict[tuple[str, int], int] | None = {} if token_labels else None
        self.gateway_seconds = Histogram(GATEWAY_BUCKETS)
        self.upstream_seconds = Histogram(UPSTREAM_BUCKETS)
        self.propagation_seconds = Histogram(PROPAGATION_BUCKETS)
        self.gauges: dict[str, Callable[[], int]] = {}

    @property
    def requests(self) -> dict[tuple[str, int], int]:
        """(decision code, status class) -> count, for each pair seen."""
        return {
            (code, status_class): count
            for code, counts in self._by_code.items()
            for status_class, count in enumerate(counts)
            if count
        }

    def request_done(self, code: str, status: int, token_id: str, elapsed: float, upstream: float) -> None:
        """One answered request: `elapsed` from its head to its answer, `upstream` of it spent waiting for
        the upstream's response head (0 when it was not forwarded). Written flat (histograms inlined, no key
        built): it runs once per request."""
        status_class = status // 100
        try:
            self._by_code[code][status_class] += 1
        except KeyError:  # a code not seen yet (statuses are three digits: 1xx to 9xx)
            self._by_code[code] = counts = [0] * 10
            counts[status_class] = 1
        if upstream:
            histogram = self.upstream_seconds
            histogram.counts[bisect_left(UPSTREAM_BUCKETS, upstream)] += 1
            histogram.sum += upstream
            elapsed -= upstream
        histogram = self.gateway_seconds
        histogram.counts[bisect_left(GATEWAY_BUCKETS, elapsed)] += 1
        histogram.sum += elapsed
        by_token = self.by_token
        if by_token is not None and token_id != "-":
            token_key = (token_id, status_class)
            by_token[token_key] = by_token.get(token_key, 0) + 1
