"""MicroBatcher with a fake forward: merging, ordering, limits and failures (no Ray, no HTTP)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest

from policy_server.policies.torch_policy import PolicyOutput
from policy_server.serving.batcher import MicroBatcher

VERSION = 7


class FakeForward:
    """Records batch sizes and concurrency; its heads echo the input (and twice the input).

    With ``gate`` set, every call waits for the gate to open; otherwise it sleeps ``delay_s``.
    Rows whose first value is ``fail_on`` make the whole call raise.
    """

    def __init__(
        self, delay_s: float = 0.005, gate: asyncio.Event | None = None, fail_on: float | None = None
    ) -> None:
        self.delay_s, self.gate, self.fail_on = delay_s, gate, fail_on
        self.calls: list[int] = []
        self.in_flight = 0
        self.peak = 0

    async def __call__(self, obs: np.ndarray) -> PolicyOutput:
        self.calls.append(len(obs))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(self.delay_s)
            if self.fail_on is not None and (obs[:, 0] == self.fail_on).any():
                raise RuntimeError(f"boom: row with {self.fail_on}")
            return PolicyOutput([obs.copy(), 2.0 * obs], VERSION)
        finally:
            self.in_flight -= 1


def request(i: int, rows: int) -> np.ndarray:
    """``rows`` rows that name their request: row r is ``[i, r]``."""
    return np.stack([np.full(rows, float(i)), np.arange(rows, dtype=float)], axis=1).astype(np.float32)


def assert_own_rows(obs: np.ndarray, out: PolicyOutput) -> None:
    assert out.version == VERSION
    assert len(out.heads) == 2
    np.testing.assert_array_equal(out.heads[0], obs)
    np.testing.assert_array_equal(out.heads[1], 2.0 * obs)


async def until(condition: Callable[[], object], steps: int = 100) -> None:
    """Let the event loop run until ``condition`` holds, without any timer."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def submit_all(batcher: MicroBatcher, inputs: list[np.ndarray]) -> list[asyncio.Task[PolicyOutput]]:
    """Start one task per input and return once every one of them has been submitted."""
    started = 0

    async def one(obs: np.ndarray) -> PolicyOutput:
        nonlocal started
        started += 1  # submit() queues its request before its first await
        return await batcher.submit(obs)

    tasks = [asyncio.create_task(one(obs)) for obs in inputs]
    await until(lambda: started == len(inputs))
    return tasks


def test_concurrent_submits_are_merged_and_each_caller_gets_its_own_rows() -> None:
    sizes = [1 + i % 3 for i in range(50)]

    async def main() -> None:
        forward = FakeForward(delay_s=0.005)
        seen: list[int] = []
        batcher = MicroBatcher(forward, max_batch_size=256, max_concurrent=2, on_batch=seen.append)
        inputs = [request(i, n) for i, n in enumerate(sizes)]
        outputs = await asyncio.gather(*(batcher.submit(obs) for obs in inputs))
        for obs, out in zip(inputs, outputs):
            assert_own_rows(obs, out)
        assert len(forward.calls) < len(sizes)
        assert sum(forward.calls) == sum(sizes)
        assert seen == forward.calls

    asyncio.run(main())


def test_requests_arriving_under_load_are_merged() -> None:
    async def main() -> None:
        forward = FakeForward(delay_s=0.005)
        batcher = MicroBatcher(forward, max_batch_size=256, max_concurrent=2)

        async def client(i: int) -> None:
            for k in range(5):
                obs = request(100 * i + k, 1 + (i + k) % 4)
                assert_own_rows(obs, await batcher.submit(obs))

        await asyncio.gather(*(client(i) for i in range(20)))
        assert sum(forward.calls) == sum(1 + (i + k) % 4 for i in range(20) for k in range(5))
        assert len(forward.calls) < 100
        assert forward.peak <= 2

    asyncio.run(main())


def test_a_lone_submit_is_sent_at_once_and_later_arrivals_form_the_next_batch() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        forward = FakeForward(gate=gate)
        batcher = MicroBatcher(forward, max_batch_size=64, max_concurrent=1)
        first = asyncio.create_task(batcher.submit(request(0, 1)))
        await until(lambda: forward.calls)  # no timer: sent within a few loop turns
        assert forward.calls == [1]

        rest = await submit_all(batcher, [request(i, 1) for i in range(1, 11)])
        assert forward.calls == [1]  # the only slot is busy: they wait together
        gate.set()
        assert_own_rows(request(0, 1), await first)
        for i, out in enumerate(await asyncio.gather(*rest), start=1):
            assert_own_rows(request(i, 1), out)
        assert forward.calls == [1, 10]

    asyncio.run(main())


def test_max_batch_size_is_respected_and_a_larger_request_goes_alone() -> None:
    sizes = [1 + (7 * i) % 5 for i in range(30)]
    sizes[12] = 20

    async def main() -> None:
        forward = FakeForward(delay_s=0.005)
        batcher = MicroBatcher(forward, max_batch_size=8, max_concurrent=2)
        inputs = [request(i, n) for i, n in enumerate(sizes)]
        outputs = await asyncio.gather(*(batcher.submit(obs) for obs in inputs))
        for obs, out in zip(inputs, outputs):
            assert_own_rows(obs, out)
        assert forward.calls.count(20) == 1
        assert all(n <= 8 for n in forward.calls if n != 20), forward.calls
        assert sum(forward.calls) == sum(sizes)
        assert len(forward.calls) < len(sizes)  # requests were still merged up to the limit

    asyncio.run(main())


@pytest.mark.parametrize("max_concurrent", [1, 3])
def test_max_concurrent_is_respected(max_concurrent: int) -> None:
    async def main() -> None:
        forward = FakeForward(delay_s=0.005)
        batcher = MicroBatcher(forward, max_batch_size=1, max_concurrent=max_concurrent)
        inputs = [request(i, 1) for i in range(12)]
        outputs = await asyncio.gather(*(batcher.submit(obs) for obs in inputs))
        for obs, out in zip(inputs, outputs):
            assert_own_rows(obs, out)
        assert forward.calls == [1] * 12
        assert forward.peak == max_concurrent

    asyncio.run(main())


def test_a_failing_forward_reaches_every_caller_of_its_batch_only() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        forward = FakeForward(gate=gate, fail_on=666.0)
        batcher = MicroBatcher(forward, max_batch_size=64, max_concurrent=1)
        first = asyncio.create_task(batcher.submit(request(0, 2)))
        await until(lambda: forward.calls)
        doomed = await submit_all(batcher, [request(i, 1) for i in (1, 666, 2)])
        gate.set()
        assert_own_rows(request(0, 2), await first)
        results = await asyncio.gather(*doomed, return_exceptions=True)
        assert forward.calls == [2, 3]
        assert all(isinstance(r, RuntimeError) for r in results), results
        assert all(str(r) == "boom: row with 666.0" for r in results)
        assert results[0] is results[1] is results[2]  # the one failure of that forward call

        later = request(3, 4)
        assert_own_rows(later, await batcher.submit(later))
        assert forward.calls == [2, 3, 4]

    asyncio.run(main())


def test_a_cancelled_caller_does_not_disturb_its_batch() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        forward = FakeForward(gate=gate)
        batcher = MicroBatcher(forward, max_batch_size=64, max_concurrent=1)
        first = asyncio.create_task(batcher.submit(request(0, 1)))
        await until(lambda: forward.calls)
        tasks = await submit_all(batcher, [request(i, 2) for i in (1, 2, 3)])
        tasks[1].cancel()
        gate.set()
        await first
        one, three = await tasks[0], await tasks[2]
        assert tasks[1].cancelled()
        assert forward.calls == [1, 6]
        assert_own_rows(request(1, 2), one)
        assert_own_rows(request(3, 2), three)

    asyncio.run(main())
