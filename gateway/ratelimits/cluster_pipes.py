"""The limits script on a Redis Cluster: one pipelined connection (pipe.py) per primary, picked by the slot of
the check's keys, and redis-py's cluster client whenever that fast path cannot answer.

Both keys of a check carry the token id as a hash tag, so they share a slot and one primary runs the script;
a pipe batches one event-loop turn's checks per slot (a script's keys must share one). The slot's primary is
read from the cluster client's layout; a pipe answers in a few microseconds as it does for one Redis.
Anything else (the layout not yet known, a MOVED or ASK because slots moved, a TRYAGAIN, a lost node) is
handed to redis-py for that one check: it follows MOVED and ASK, and a node it cannot reach marks the layout
to be read again, so the next check's pipe goes to the new primary. Only when redis-py fails too does the
check fail (and the limiter counts in the process for a while, as for one Redis down).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import lru_cache
from typing import Any

from redis.crc import key_slot

from gateway.ratelimits.pipe import ReplyError, ScriptPipe
from gateway.redis_cluster import GatewayCluster


@lru_cache(maxsize=65_536)
def _slot(key: str) -> int:
    """A token's keys are hashed once, not on every check (a CRC16 in Python)."""
    return int(key_slot(key.encode()))


class ClusterPipes:
    def __init__(
        self,
        cluster: GatewayCluster,
        script: str,
        fallback: Callable[[Sequence[str], Sequence[str | bytes]], Awaitable[Any]],
        *,
        keys_per_call: int,
        arguments_per_call: int,
        timeout: float,
    ) -> None:
        self._cluster = cluster
        self._script = script
        self._fallback = fallback
        self._keys_per_call = keys_per_call
        self._arguments_per_call = arguments_per_call
        self._timeout = timeout
        self._pipes: dict[str, ScriptPipe] = {}
        self.fallbacks = 0  # checks redis-py ran because no pipe could

    async def close(self) -> None:
        for pipe in self._pipes.values():
            await pipe.close()
        self._pipes.clear()

    async def call(
        self,
        keys: Sequence[str],
        encoded_keys: bytes,
        arguments: bytes,
        plain_arguments: Sequence[str | bytes],
        *,
        replay: bool = True,
    ) -> bytes:
        """The check's line of the script's reply: `encoded_keys` and `arguments` as ScriptPipe.call takes
        them, `keys` and `plain_arguments` the same for redis-py. `replay=False`: a call that must not run
        twice (a lease's give-back) is not handed to redis-py when the pipe fails, since the pipe may have
        run it before it failed (a timeout, a connection lost after the write)."""
        slot = _slot(keys[0])
        pipe = self._pipe_for(slot)
        if pipe is not None:
            try:
                return await pipe.call(encoded_keys, arguments, slot)
            except (ReplyError, OSError):
                if not replay:
                    raise
        self.fallbacks += 1
        line = await self._fallback(keys, plain_arguments)
        return line.encode() if isinstance(line, str) else bytes(line)

    def _pipe_for(self, slot: int) -> ScriptPipe | None:
        slots = self._cluster.nodes_manager.slots_cache.get(slot)
        if not slots:
            return None
        node = slots[0]
        pipe = self._pipes.get(node.name)
        if pipe is None:
            options = self._cluster.connection_kwargs
            pipe = ScriptPipe(
                self._script,
                keys_per_call=self._keys_per_call,
                arguments_per_call=self._arguments_per_call,
                host=node.host,
                port=int(node.port),
                username=options.get("username"),
                password=options.get("password"),
                timeout=self._timeout,
            )
            self._pipes[node.name] = pipe
        return pipe
