"""Prometheus metrics: counters kept by hand on the hot path (counters.py), their text exposition
(exposition.py) and the listener that serves them on an address of their own (listener.py)."""

from gateway.metrics.counters import Histogram, Metrics

__all__ = ["Histogram", "Metrics"]
