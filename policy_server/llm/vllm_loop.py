"""The event loop vLLM's ``AsyncLLM`` lives on: a daemon thread of the replica's process, so that
``VLLMEngine`` answers callers on any loop or thread (see ``vllm_engine``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Loop:
    """An event loop in a daemon thread: vLLM's ``AsyncLLM`` lives and is called on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-engine", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the engine loop from another loop; cancelling the caller cancels it."""
        return await asyncio.wrap_future(self.submit(coro))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


async def next_item(items: AsyncIterator[T]) -> T | None:
    return await anext(items, None)


async def close_items(items: AsyncIterator[Any]) -> None:
    await items.aclose()  # type: ignore[attr-defined]
