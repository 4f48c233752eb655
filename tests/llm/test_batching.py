"""GenerationQueue with a recording generate function: grouping, caps, failures, bounds, close."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from support import wait_until_async

from policy_server.errors import (
    BackendUnavailable,
    InvalidRequest,
    ModelError,
    PayloadTooLarge,
    PolicyServerError,
    QueueFull,
)
from policy_server.llm.batching import GenerationQueue

FAIL = -1  # a prompt starting with this token makes its whole generate call raise


@dataclass(frozen=True)
class Params:
    temperature: float = 0.7
    num_samples: int = 1
    max_new_tokens: int = 4

    def batch_key(self) -> tuple[float, int, int]:
        return (self.temperature, self.num_samples, self.max_new_tokens)


class RecordingGenerate:
    """Records each call's prompts and (shared) params; answers each prompt with ``num_samples`` tagged copies.

    While ``gate`` is closed, calls block, so requests pile up in the queue behind the first one.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[list[list[int]], Params]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, prompts: list[list[int]], each: list[Params]) -> list[list[tuple[list[int], int]]]:
        assert len(each) == len(prompts) and len({p.batch_key() for p in each}) == 1
        params = each[0]
        self.calls.append(([list(p) for p in prompts], params))
        self.entered.set()
        assert self.gate.wait(5), "test gate never opened"
        if any(p[0] == FAIL for p in prompts):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return [[(list(p), i) for i in range(params.num_samples)] for p in prompts]

    def block(self) -> None:
        self.gate.clear()
        self.entered.clear()


@pytest.fixture
def gen() -> RecordingGenerate:
    return RecordingGenerate()


@pytest.fixture
def make_queue(gen: RecordingGenerate) -> Iterator[Callable[..., GenerationQueue[tuple[list[int], int]]]]:
    queues: list[GenerationQueue[tuple[list[int], int]]] = []

    def make(**kwargs: object) -> GenerationQueue[tuple[list[int], int]]:
        queues.append(GenerationQueue(gen, **kwargs))  # type: ignore[arg-type]
        return queues[-1]

    yield make
    gen.gate.set()
    for queue in queues:
        queue.close()


def occupy_worker(queue: GenerationQueue[tuple[list[int], int]], gen: RecordingGenerate) -> object:
    """Start a request that holds the worker inside generate until ``gen.gate`` opens."""
    gen.block()
    future = queue.submit_future([0], Params(temperature=9.0))
    assert gen.entered.wait(5)
    return future


def test_equal_keys_share_one_call_and_different_keys_get_their_own(make_queue, gen) -> None:
    queue = make_queue()
    a, b = Params(temperature=0.5), Params(temperature=1.0, num_samples=2)

    async def main() -> list[list[tuple[list[int], int]]]:
        occupy_worker(queue, gen)
        order = [([1], a), ([2], b), ([3], a), ([4], b), ([5], a)]
        tasks = [asyncio.create_task(queue.submit(p, params)) for p, params in order]
        await wait_until_async(lambda: queue.stats().queued >= len(order), timeout=5.0)
        gen.gate.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert [(prompts, params) for prompts, params in gen.calls[1:]] == [([[1], [3], [5]], a), ([[2], [4]], b)]
    assert results == [
        [([1], 0)],
        [([2], 0), ([2], 1)],
        [([3], 0)],
        [([4], 0), ([4], 1)],
        [([5], 0)],
    ]
    stats = queue.stats()
    assert (stats.queued, stats.running, stats.batches, stats.failed_batches) == (0, 0, 3, 0)
    assert stats.mean_batch_size == pytest.approx(6 / 3)


def test_a_group_is_capped_at_max_batch_prompts(make_queue, gen) -> None:
    queue = make_queue(max_batch_prompts=2)
    occupy_worker(queue, gen)
    futures = [queue.submit_future([i], Params()) for i in range(1, 6)]
    gen.gate.set()
    assert [f.result(5) for f in futures] == [[([i], 0)] for i in range(1, 6)]
    assert [prompts for prompts, _ in gen.calls[1:]] == [[[1], [2]], [[3], [4]], [[5]]]


def test_a_failing_group_fails_only_its_own_requests(make_queue, gen) -> None:
    queue = make_queue()
    bad, good = Params(temperature=0.1), Params(temperature=0.2)

    async def main() -> list[object]:
        occupy_worker(queue, gen)
        tasks = [
            asyncio.create_task(queue.submit([FAIL, 1], bad)),
            asyncio.create_task(queue.submit([7], good)),
            asyncio.create_task(queue.submit([2], bad)),
        ]
        await wait_until_async(lambda: queue.stats().queued >= 3, timeout=5.0)
        gen.gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    failed_1, ok, failed_2 = asyncio.run(main())
    assert ok == [([7], 0)]
    for failed in (failed_1, failed_2):
        assert isinstance(failed, ModelError)
        assert "device-side assert" in failed.message
        assert isinstance(failed.__cause__, RuntimeError)
    assert queue.stats().failed_batches == 1
    assert queue.submit_future([3], bad).result(5) == [([3], 0)]  # the worker lives on


def test_a_policy_server_error_from_the_generator_passes_through_unchanged() -> None:
    def generate(prompts: list[list[int]], params: list[Params]) -> list[list[int]]:
        raise InvalidRequest.at("body.stop", "stop string longer than max_new_tokens")

    queue: GenerationQueue[int] = GenerationQueue(generate)  # type: ignore[arg-type]
    try:
        with pytest.raises(InvalidRequest, match="stop string"):
            queue.submit_future([1], Params()).result(5)
    finally:
        queue.close()


def test_submit_beyond_max_queued_raises_queue_full(make_queue, gen) -> None:
    queue = make_queue(max_queued=2)
    occupy_worker(queue, gen)  # running, so not counted as queued
    queue.submit_future([1], Params())
    queue.submit_future([2], Params())
    with pytest.raises(QueueFull, match="max_queued=2") as info:
        queue.submit_future([3], Params())
    error = info.value
    assert isinstance(error, PolicyServerError)
    assert (error.status, error.code) == (429, "queue_full")
    assert 1 <= error.retry_after_s <= 60
    assert queue.stats().queued == 2


def test_the_token_bound_counts_prompt_and_new_tokens_of_every_sample(make_queue, gen) -> None:
    queue = make_queue(max_queued_tokens=20)
    occupy_worker(queue, gen)
    queue.submit_future([1, 2], Params(num_samples=2, max_new_tokens=4))  # 2 * (2 + 4) = 12
    assert queue.stats().queued_tokens == 12
    with pytest.raises(QueueFull, match="max_queued_tokens=20"):
        queue.submit_future([1, 2, 3, 4, 5], Params(max_new_tokens=4))  # 9 more: 21 > 20
    queue.submit_future([1, 2, 3, 4], Params(max_new_tokens=4))  # 8 more: exactly 20
    with pytest.raises(PayloadTooLarge, match="lower num_samples"):  # can never fit: no point retrying
        queue.submit_future([1], Params(num_samples=3, max_new_tokens=10))


def test_an_empty_prompt_is_refused(make_queue) -> None:
    with pytest.raises(InvalidRequest, match="no tokens"):
        make_queue().submit_future([], Params())


def test_close_fails_pending_requests_and_lets_the_running_one_finish(make_queue, gen) -> None:
    queue = make_queue()

    async def main() -> tuple[object, list[object]]:
        running = occupy_worker(queue, gen)
        pending = [asyncio.create_task(queue.submit([i], Params())) for i in (1, 2)]
        await wait_until_async(lambda: queue.stats().queued >= 2, timeout=5.0)
        queue.close(timeout_s=0)
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
        gen.gate.set()
        return await asyncio.wrap_future(running), outcomes  # type: ignore[arg-type]

    finished, outcomes = asyncio.run(main())
    assert finished == [([0], 0)]
    for outcome in outcomes:
        assert isinstance(outcome, BackendUnavailable)
        assert "closed before this request ran" in outcome.message
    with pytest.raises(BackendUnavailable, match="closed"):
        queue.submit_future([3], Params())
    assert len(gen.calls) == 1


def test_a_cancelled_caller_is_withdrawn_before_its_batch_runs(make_queue, gen) -> None:
    queue = make_queue()

    async def main() -> list[tuple[list[int], int]]:
        occupy_worker(queue, gen)
        gone = asyncio.create_task(queue.submit([1], Params()))
        kept = asyncio.create_task(queue.submit([2], Params()))
        await wait_until_async(lambda: queue.stats().queued >= 2, timeout=5.0)
        gone.cancel()
        await wait_until_async(lambda: queue.stats().queued <= 1, timeout=5.0)
        gen.gate.set()
        return await kept

    assert asyncio.run(main()) == [([2], 0)]
    assert [prompts for prompts, _ in gen.calls[1:]] == [[[2]]]
    assert queue.stats().queued_tokens == 0


def test_batch_wait_lets_a_batch_fill_and_a_full_batch_leaves_at_once(make_queue, gen) -> None:
    queue = make_queue(max_batch_prompts=2, batch_wait_ms=5_000)
    started = time.monotonic()
    first = queue.submit_future([1], Params())
    time.sleep(0.02)
    second = queue.submit_future([2], Params())
    assert [first.result(5), second.result(5)] == [[([1], 0)], [([2], 0)]]
    assert time.monotonic() - started < 2  # full at 2 prompts: it did not wait the 5 s out
    assert [prompts for prompts, _ in gen.calls] == [[[1], [2]]]


def test_many_threads_submitting_at_once_all_get_their_own_answers(make_queue, gen) -> None:
    queue = make_queue(max_batch_prompts=8, max_queued=1000)
    results: dict[int, object] = {}

    def client(i: int) -> None:
        results[i] = queue.submit_future([i], Params(temperature=float(i % 3))).result(5)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(1, 65)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: [([i], 0)] for i in range(1, 65)}
    for prompts, params in gen.calls:
        assert {prompt[0] % 3 for prompt in prompts} == {int(params.temperature)}
        assert len(prompts) <= 8
