"""The limits script on a Redis Cluster: one pipelined connection (pipe.py) per primary, picked by the slot of
the check's keys, and redis-py's cluster client whenever that fast path cannot answer.

Both keys of a check carry the token id as a hash tag, so they share a slot and one primary runs the script.
The slot's primary is read from the cluster client's layout; a pipe answers in a few microseconds as it does
for one Redis. Anything else (the layout not yet known, a MOVED or ASK because slots moved, a TRYAGAIN, a
lost node) is handed to redis-py for that one check: it follows MOVED and ASK, and a node it cannot reach
marks the layout to be read again, so the next check's pipe goes to the new primary. Only when redis-py fails
too does the check fail (and the limiter counts in the process for a while, as for one Redis down).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.ratelimits.pipe import ReplyError, ScriptPipe
from gateway.redis_cluster import GatewayCluster


class ClusterPipes:
    def __init__(
        self,
        cluster: GatewayCluster,
        script: str,
        fallback: Callable[[Sequence[str], Sequence[str | int]], Awaitable[Any]],
        *,
        timeout: float,
    ) -> None:
        self._cluster = cluster
        self._script = script
        self._fallback = fallback
        self._timeout = timeout
        self._pipes: dict[str, ScriptPipe] = {}
        self.fallbacks = 0  # checks redis-py ran because no pipe could

    async def close(self) -> None:
        for pipe in self._pipes.values():
            await pipe.close()
        self._pipes.clear()

    async def run(self, keys: Sequence[str], arguments: Sequence[str | int]) -> Any:
        pipe = self._pipe_for(keys[0])
        if pipe is not None:
            try:
                return await pipe.run(keys, arguments)
            except (ReplyError, OSError):
                pass
        self.fallbacks += 1
        return await self._fallback(keys, arguments)

    def _pipe_for(self, key: str) -> ScriptPipe | None:
        slots = self._cluster.nodes_manager.slots_cache.get(self._cluster.keyslot(key))
        if not slots:
            return None
        node = slots[0]
        pipe = self._pipes.get(node.name)
        if pipe is None:
            options = self._cluster.connection_kwargs
            pipe = ScriptPipe(
                self._script,
                host=node.host,
                port=int(node.port),
                username=options.get("username"),
                password=options.get("password"),
                timeout=self._timeout,
            )
            self._pipes[node.name] = pipe
        return pipe
