"""merge_chunks and coalesced: fewer stream items, the same samples."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from policy_server.llm.chunks import coalesced, merge_chunks
from policy_server.llm.params import SampleChunk


def chunk(index: int, tokens: list[int], finish: str | None = None, version: int = 0) -> SampleChunk:
    return SampleChunk(index, tokens, [-0.5 * t for t in tokens], [{t: -0.1} for t in tokens],
                       finish, "@@" if finish == "stop" else None, version)  # type: ignore[arg-type]


def joined(chunks: list[SampleChunk], index: int) -> tuple[list[int], list[float], list[dict[int, float]]]:
    mine = [c for c in chunks if c.index == index]
    return ([t for c in mine for t in c.token_ids], [x for c in mine for x in c.log_probs],
            [t for c in mine for t in c.top_logprobs or []])


def test_merging_keeps_each_samples_tokens_its_end_and_its_versions() -> None:
    chunks = [chunk(0, [1]), chunk(1, [7]), chunk(0, [2, 3]), chunk(1, [8], "length"), chunk(0, [4], "stop")]
    merged = merge_chunks(chunks)
    assert [c.index for c in merged] == [0, 1]
    for index in (0, 1):
        assert joined(merged, index) == joined(chunks, index)
    assert (merged[0].finish_reason, merged[0].stop_string) == ("stop", "@@")
    assert merged[1].finish_reason == "length"
    swapped = merge_chunks([chunk(0, [1]), chunk(0, [2]), chunk(0, [3], version=1), chunk(0, [4], "stop", version=1)])
    assert [(c.token_ids, c.model_version) for c in swapped] == [([1, 2], 0), ([3, 4], 1)]
    assert merge_chunks([]) == []


async def produce(n: int, fail_at: int | None = None, closed: list[bool] | None = None) -> AsyncIterator[SampleChunk]:
    try:
        for i in range(n):
            if i == fail_at:
                raise RuntimeError("engine broke")
            yield chunk(i % 2, [i], "length" if i >= n - 2 else None)
            await asyncio.sleep(0)  # an engine awaits between its chunks
    finally:
        if closed is not None:
            closed.append(True)


def test_a_slow_reader_gets_fewer_chunks_that_add_up_to_the_same_samples() -> None:
    async def read_slowly() -> list[SampleChunk]:
        got = []
        async for c in coalesced(produce(200)):
            got.append(c)
            await asyncio.sleep(0.01)  # the producer runs ahead meanwhile
        return got

    got = asyncio.run(read_slowly())
    every = [chunk(i % 2, [i], "length" if i >= 198 else None) for i in range(200)]
    assert len(got) < 20
    for index in (0, 1):
        assert joined(got, index) == joined(every, index)
    assert {c.finish_reason for c in got if c.index == 0 and c.token_ids[-1] == 198} == {"length"}


def test_an_error_comes_after_the_chunks_before_it_and_closing_stops_the_producer() -> None:
    async def read_all() -> list[SampleChunk]:
        return [c async for c in coalesced(produce(10, fail_at=5))]

    with pytest.raises(RuntimeError, match="engine broke"):
        asyncio.run(read_all())

    async def leave_early(closed: list[bool]) -> list[SampleChunk]:
        stream = coalesced(produce(10**9, closed=closed))
        first = [await anext(stream)]
        await stream.aclose()  # type: ignore[attr-defined]
        return first

    closed: list[bool] = []
    assert len(asyncio.run(leave_early(closed))) == 1 and closed == [True]
