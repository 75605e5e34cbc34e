"""Readiness: whether this process can do its work (the store answers, and Redis too when configured), and
with Redis, where rate limits are counted ("shared", or "per process (redis unavailable)").

The admin API reports it at /readyz; the proxy port answers it, without credentials, at `proxy_health_path`
for load balancers. That path is matched exactly against the request's normalised path and never forwarded:
a load balancer's probe must not reach the upstream, and no spelling of the path (`%2e`, `./`, `//`) may
slip past the match to the upstream either.

A probe on the public port must not be a lever on the store: the answer is kept for `max_age` seconds and
concurrent probes share one check.
"""

from __future__ import annotations

import asyncio
import json

from gateway.request_target import TargetRefused, canonical_path
from gateway.core import Core
from gateway.redis_cluster import GatewayCluster

CHECK_TIMEOUT = 2.0


async def readiness(core: Core) -> tuple[bool, dict[str, str]]:
    """Ready or not, and each dependency's state ("ok", "unavailable", "not configured")."""
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(core.store.ping(), timeout=CHECK_TIMEOUT)
        checks["store"] = "ok"
    except Exception:
        checks["store"] = "unavailable"
    if core.shared is None:
        checks["redis"] = "not configured"
    else:
        try:
            client = core.shared.client
            # On a cluster, every primary: each serves a part of the tokens, the counts and the limits.
            ping = client.ping(target_nodes=client.PRIMARIES) if isinstance(client, GatewayCluster) else client.ping()
            await asyncio.wait_for(ping, timeout=CHECK_TIMEOUT)
            checks["redis"] = "ok"
        except Exception:
            checks["redis"] = "unavailable"
        # Where tokens' rate limits and quotas are counted: in Redis by every replica together, or by each
        # process on its own while Redis does not answer (each replica then admits a whole budget).
        shared = checks["redis"] == "ok" and core.limiter.mode == "shared"
        checks["rate_limits"] = "shared" if shared else "per process (redis unavailable)"
    ready = checks["store"] == "ok" and checks["redis"] in ("ok", "not configured")
    return ready, checks


class HealthProbe:
    """Answers the proxy port's health path: 200 when ready, 503 when not, a small JSON body either way."""

    def __init__(self, core: Core, path: str, *, max_age: float = 1.0) -> None:
        self._core = core
        self.path = path.encode("ascii")
        self._max_age = max_age
        self._answer: tuple[int, bytes] | None = None
        self._checked_at = 0.0
        self._pending: asyncio.Task[tuple[int, bytes]] | None = None

    def matches(self, target: bytes) -> bool:
        """Whether a request target (origin form) names the health path once normalised."""
        path = target.partition(b"?")[0]
        if path == self.path:
            return True
        # `find`, not `in`: on Python 3.11 `bytes in bytes` first tries the operand as an integer, raising and
        # clearing a TypeError each time (1.8k instructions, against 0.1k).
        if path.find(b"%") < 0 and path.find(b"/.") < 0 and path.find(b"//") < 0:
            return False  # nothing to decode or resolve: the path is its own canonical form
        try:
            return canonical_path(path.decode("latin-1")).encode("latin-1") == self.path
        except TargetRefused:
            return False  # refused with 400 once authenticated, like any ambiguous path

    async def answer(self) -> tuple[int, bytes]:
        """The status and body, from a check at most `max_age` seconds old."""
        loop = asyncio.get_running_loop()
        if self._answer is not None and loop.time() - self._checked_at < self._max_age:
            return self._answer
        if self._pending is None or self._pending.done():
            # A task of its own: a probe whose client goes away must not cancel the check the others wait on.
            self._pending = loop.create_task(self._check())
        return await asyncio.shield(self._pending)

    async def _check(self) -> tuple[int, bytes]:
        ready, checks = await readiness(self._core)
        body = json.dumps({"status": "ok" if ready else "unavailable", **checks}).encode()
        self._answer = (200 if ready else 503, body)
        self._checked_at = asyncio.get_running_loop().time()
        return self._answer
