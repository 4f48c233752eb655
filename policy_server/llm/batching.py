"""The request path of an LLM deployment: a bounded queue whose worker batches equal requests.

Concurrent ``submit`` calls wait in one queue. A worker thread takes the oldest request, gathers
every queued request whose ``params.batch_key()`` equals its key (up to ``max_batch_prompts``
prompts), and runs them through one blocking ``generate_fn(prompts, params)`` call (``params[i]``:
prompt i's request's, all with one batch key); requests with other keys wait for the next call, so
the generator never sees parameters it cannot decode together. A failing call
fails only the requests it carried. The queue is bounded in requests and, optionally, in tokens,
so queued work can never exhaust memory: beyond the bound ``submit`` raises ``QueueFull`` (429).

The worker is a thread rather than an asyncio task so that the queue serves any event loop (a
Serve replica's, a test's ``asyncio.run``) and plain threads alike (``submit_future``).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from policy_server.errors import (
    BackendUnavailable,
    InvalidRequest,
    ModelError,
    PayloadTooLarge,
    PolicyServerError,
    QueueFull,
    summary,
)

S = TypeVar("S")


class BatchParams(Protocol):
    """What the queue needs of ``GenerationParams``."""

    @property
    def num_samples(self) -> int: ...

    @property
    def max_new_tokens(self) -> int: ...

    def batch_key(self) -> Hashable: ...


GenerateFn = Callable[[list[list[int]], list[Any]], list[list[S]]]
"""``generate_fn(prompts, params)``: each prompt's samples; ``params[i]`` is what prompt i's caller
submitted (a ``BatchParams``; every one of a call has the same batch key)."""


def request_tokens(prompt_ids: list[int], params: BatchParams) -> int:
    """The tokens a request can occupy while it is generated: every sample holds a full sequence."""
    return params.num_samples * (len(prompt_ids) + params.max_new_tokens)


@dataclass(frozen=True)
class QueueStats:
    queued: int
    """Requests waiting for a generate call."""
    queued_tokens: int
    """``request_tokens`` summed over the waiting requests."""
    running: int
    """Requests inside the generate call now running (0 or the size of one batch)."""
    batches: int
    """Generate calls made so far, failed ones included."""
    failed_batches: int
    mean_batch_size: float
    """Prompts per generate call, averaged over all calls (0.0 before the first)."""


@dataclass(eq=False)
class _Request(Generic[S]):
    prompt_ids: list[int]
    params: BatchParams
    key: Hashable
    tokens: int
    future: Future[list[S]]


class GenerationQueue(Generic[S]):
    """Batches concurrent generation requests into calls of ``generate_fn``; call ``close()`` when done.

    ``generate_fn(prompts, params)`` returns, for each prompt in order, its list of samples. It runs
    in the queue's worker thread, one call at a time. ``batch_wait_ms`` holds a batch that is not
    full for at most that long so that more requests can join it; 0 sends at once.
    """

    def __init__(
        self,
        generate_fn: GenerateFn[S],
        *,
        max_batch_prompts: int = 16,
        max_queued: int = 256,
        max_queued_tokens: int | None = None,
        batch_wait_ms: float = 0.0,
        name: str = "llm-generation",
    ) -> None:
        if max_batch_prompts < 1 or max_queued < 1:
            raise ValueError(
                f"max_batch_prompts and max_queued must be >= 1, not {max_batch_prompts}, {max_queued}"
            )
        if max_queued_tokens is not None and max_queued_tokens < 1:
            raise ValueError(f"max_queued_tokens must be >= 1 or None, not {max_queued_tokens}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, not {batch_wait_ms}")
        self._generate = generate_fn
        self._max_batch = max_batch_prompts
        self._max_queued = max_queued
        self._max_tokens = max_queued_tokens
        self._wait_s = batch_wait_ms / 1000
        self._cond = threading.Condition()
        self._queue: deque[_Request[S]] = deque()
        self._queued_tokens = 0
        self._running = 0
        self._batches = 0
        self._failed_batches = 0
        self._batched_prompts = 0
        self._batch_s = 0.0  # moving average of one call's duration, for Retry-After
        self._closed = False
        self._worker = threading.Thread(target=self._work, name=name, daemon=True)
        self._worker.start()

    async def submit(self, prompt_ids: list[int], params: BatchParams) -> list[S]:
        """Generate ``params.num_samples`` samples for one prompt, batched with concurrent callers.

        Cancelling the awaiting task withdraws the request if its batch has not started yet.
        """
        return await asyncio.wrap_future(self.submit_future(prompt_ids, params))

    def submit_future(self, prompt_ids: list[int], params: BatchParams) -> Future[list[S]]:
        """``submit`` for callers outside an event loop: a future of the prompt's samples."""
        if not prompt_ids:
            raise InvalidRequest.at("body", "the prompt has no tokens: send at least one token (a bos token will do)")
        tokens = request_tokens(prompt_ids, params)
        if self._max_tokens is not None and tokens > self._max_tokens:
            raise PayloadTooLarge(
                f"the request needs {tokens} tokens ({params.num_samples} samples x ({len(prompt_ids)} prompt "
                f"+ {params.max_new_tokens} new)), more than this deployment ever queues ({self._max_tokens}); "
                "lower num_samples, max_new_tokens or the prompt length"
            )
        request: _Request[S] = _Request(list(prompt_ids), params, params.batch_key(), tokens, Future())
        with self._cond:
            if self._closed:
                raise BackendUnavailable(
                    "the generation queue is closed: the LLM deployment is shutting down"
                )
            self._check_room(tokens)
            self._queue.append(request)
            self._queued_tokens += tokens
            self._cond.notify_all()
        request.future.add_done_callback(lambda _: self._withdraw_if_cancelled(request))
        return request.future

    def stats(self) -> QueueStats:
        with self._cond:
            mean = self._batched_prompts / self._batches if self._batches else 0.0
            return QueueStats(
                len(self._queue),
                self._queued_tokens,
                self._running,
                self._batches,
                self._failed_batches,
                mean,
            )

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Stop taking requests, fail the queued ones, let a running call finish and stop the worker."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._queued_tokens = 0
            self._cond.notify_all()
        error = BackendUnavailable(
            "the generation queue was closed before this request ran (the LLM deployment is shutting "
            "down or restarting); send it again"
        )
        for request in pending:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(error)
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout_s)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_room(self, tokens: int) -> None:
        if len(self._queue) >= self._max_queued:
            reason = f"{len(self._queue)} requests are queued (max_queued={self._max_queued})"
        elif self._max_tokens is not None and self._queued_tokens + tokens > self._max_tokens:
            reason = (
                f"{self._queued_tokens} tokens are queued and this request needs {tokens} "
                f"(max_queued_tokens={self._max_tokens})"
            )
        else:
            return
        retry = self._retry_after_s()
        raise QueueFull(f"the generation queue is full: {reason}; retry in {retry} s", retry_after_s=retry)

    def _retry_after_s(self) -> int:
        """Seconds until the queue has drained by about one batch, 1 to 60."""
        batches_ahead = math.ceil((len(self._queue) + 1) / self._max_batch)
        return min(60, max(1, math.ceil(batches_ahead * self._batch_s)))

    def _withdraw_if_cancelled(self, request: _Request[S]) -> None:
        if not request.future.cancelled():
            return
        with self._cond:
            try:
                self._queue.remove(request)
            except ValueError:  # already taken (and dropped) by the worker, or failed by close
                return
            self._queued_tokens -= request.tokens

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[_Request[S]] | None:
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                self._wait_for_more()
                batch = self._take()
                if batch:
                    self._running = len(batch)
                    return batch

    def _wait_for_more(self) -> None:
        """Hold a batch that is not full for up to ``batch_wait_ms`` (lock held)."""
        deadline = time.monotonic() + self._wait_s
        while self._queue and not self._closed and self._count_key(self._queue[0].key) < self._max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _count_key(self, key: Hashable) -> int:
        return sum(1 for request in self._queue if request.key == key)

    def _take(self) -> list[_Request[S]]:
        """Pop the oldest request's key group, oldest first, up to ``max_batch_prompts`` (lock held)."""
        if not self._queue:
            return []
        key = self._queue[0].key
        batch: list[_Request[S]] = []
        rest: deque[_Request[S]] = deque()
        for request in self._queue:
            if len(batch) < self._max_batch and request.key == key:
                self._queued_tokens -= request.tokens
                if request.future.set_running_or_notify_cancel():  # False: the caller gave up
                    batch.append(request)
            else:
                rest.append(request)
        self._queue = rest
        return batch

    def _run(self, batch: list[_Request[S]]) -> None:
        started = time.monotonic()
        try:
            results = self._generate([r.prompt_ids for r in batch], [r.params for r in batch])
            if len(results) != len(batch):
                raise ModelError(f"the generator returned {len(results)} results for {len(batch)} prompts")
        except BaseException as exc:
            self._count_batch(len(batch), time.monotonic() - started, failed=True)
            error = (
                exc
                if isinstance(exc, PolicyServerError)
                else ModelError(f"generation failed: {summary(exc)}")
            )
            if error is not exc:
                error.__cause__ = exc
            for request in batch:
                request.future.set_exception(error)
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: stop serving
                self.close(timeout_s=0)
                raise
        else:
            self._count_batch(len(batch), time.monotonic() - started, failed=False)
            for request, samples in zip(batch, results, strict=True):
                request.future.set_result(samples)

    def _count_batch(self, size: int, elapsed_s: float, failed: bool) -> None:
        """Book a finished call before its callers wake, so that they see it in ``stats()``."""
        with self._cond:
            self._batch_s = elapsed_s if not self._batches else 0.8 * self._batch_s + 0.2 * elapsed_s
            self._running = 0
            self._batches += 1
            self._failed_batches += failed
            self._batched_prompts += size
