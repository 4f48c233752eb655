"""Gateway-side dynamic batching: concurrent requests share one call to the backend.

A batch leaves as soon as a slot is free (at most ``max_concurrent`` batches in flight); the
requests that arrive while the slots are busy form the next batch. So a lone client waits for no
window, and under load the batch grows with the load. ``wait_s`` optionally holds a batch that is
not full for a little longer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

from policy_server.policies.torch_policy import PolicyOutput

Forward = Callable[[np.ndarray], Awaitable[PolicyOutput]]


class MicroBatcher:
    def __init__(
        self,
        forward: Forward,
        max_batch_size: int,
        max_concurrent: int = 2,
        wait_s: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._forward = forward
        self._max_rows = max_batch_size
        self._wait_s = wait_s
        self._slots = asyncio.Semaphore(max_concurrent)
        self._pending: deque[tuple[np.ndarray, asyncio.Future[PolicyOutput]]] = deque()
        self._pending_rows = 0
        self._drainer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_batch = on_batch

    async def submit(self, obs: np.ndarray) -> PolicyOutput:
        """Run ``obs`` ``(B, obs_dim)`` through the model, batched with concurrent callers."""
        future: asyncio.Future[PolicyOutput] = asyncio.get_running_loop().create_future()
        self._pending.append((obs, future))
        self._pending_rows += len(obs)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            await self._slots.acquire()
            if self._wait_s and self._pending_rows < self._max_rows:
                await asyncio.sleep(self._wait_s)
            batch = self._take()
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future[PolicyOutput]]]:
        """Pop whole requests up to ``max_batch_size`` rows (a larger request goes alone)."""
        batch = [self._pending.popleft()]
        rows = len(batch[0][0])
        while self._pending and rows + len(self._pending[0][0]) <= self._max_rows:
            item = self._pending.popleft()
            batch.append(item)
            rows += len(item[0])
        self._pending_rows -= rows
        return batch

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future[PolicyOutput]]]) -> None:
        try:
            obs = batch[0][0] if len(batch) == 1 else np.concatenate([o for o, _ in batch])
            if self._on_batch is not None:
                self._on_batch(len(obs))
            out = await self._forward(obs)
        except BaseException as exc:  # every waiting request gets the failure, cancellation too
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            start = 0
            for o, future in batch:
                if not future.done():
                    future.set_result(out.slice(start, start + len(o)))
                start += len(o)
        finally:
            self._slots.release()
