"""Background loops tied to an app's life, as aiohttp cleanup contexts: started on start-up, cancelled on
shutdown, after which the loop's own `finally` (a last flush, say) runs.

Shutdown waits a bounded time: a client library that swallows a cancellation (redis-py's pub/sub can, while
it reconnects) must not keep the process from exiting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiohttp import web

STOP_TIMEOUT = 3.0
log = logging.getLogger(__name__)

LoopFactory = Callable[[web.Application], Coroutine[Any, Any, None] | None]


def raise_if_cancelling() -> None:
    """For loops that catch client errors: on Python 3.11 a cancellation that meets a timeout inside a
    client library can surface as that library's TimeoutError; the task still knows it was cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def background_task(name: str, make: LoopFactory) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        coroutine = make(app)
        if coroutine is None:  # not needed in this configuration
            yield
            return
        task = asyncio.create_task(coroutine, name=name)
        yield
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
        if not done:
            log.warning("background task %s did not stop within %gs; leaving it", name, STOP_TIMEOUT)
            return
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context
