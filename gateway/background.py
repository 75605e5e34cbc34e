"""Background loops tied to an app's life, as aiohttp cleanup contexts: started on start-up, cancelled on
shutdown, after which the loop's own `finally` (a last flush, say) runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiohttp import web

LoopFactory = Callable[[web.Application], Coroutine[Any, Any, None] | None]


def background_task(name: str, make: LoopFactory) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        coroutine = make(app)
        if coroutine is None:  # not needed in this configuration
            yield
            return
        task = asyncio.create_task(coroutine, name=name)
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context
