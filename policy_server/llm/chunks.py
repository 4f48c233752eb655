"""Fewer, larger stream items: the chunks of a generation that queued up while their reader was
busy, merged per sample.

Each item of a Serve stream is a Ray message (and each gateway chunk an SSE event); under load a
replica's engine makes tokens faster than its loop sends them one by one, so ``coalesced`` sends
what has queued up since the last send as one chunk per sample. Merging never changes what a
sample's chunks add up to, nor where it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from policy_server.llm.params import SampleChunk


def merge_chunks(chunks: list[SampleChunk]) -> list[SampleChunk]:
    """Consecutive chunks of each sample joined into one (tokens, log-probs and top log-probs
    concatenated; the finish reason and stop string of the last), samples in order of their first
    chunk. A chunk made by another model version than the one before it starts a new chunk, so
    every chunk keeps naming the version that made its tokens."""
    runs: list[list[SampleChunk]] = []
    growing: dict[int, int] = {}  # sample index -> its run still growing, by position in runs
    for chunk in chunks:
        at = growing.get(chunk.index)
        if at is None or runs[at][-1].model_version != chunk.model_version:
            growing[chunk.index] = len(runs)
            runs.append([chunk])
        else:
            runs[at].append(chunk)
    return [_joined(run) for run in runs]


def _joined(run: list[SampleChunk]) -> SampleChunk:
    if len(run) == 1:
        return run[0]
    first, last = run[0], run[-1]
    tops = None if first.top_logprobs is None else [t for c in run for t in c.top_logprobs or []]
    return dataclasses.replace(
        last, token_ids=[t for c in run for t in c.token_ids], log_probs=[x for c in run for x in c.log_probs],
        top_logprobs=tops,
    )


_END = object()


async def coalesced(chunks: AsyncIterator[SampleChunk]) -> AsyncIterator[SampleChunk]:
    """``chunks``, read as fast as they come by a task of its own; each step yields what queued up
    since the last (``merge_chunks``). An error of ``chunks`` is raised after the chunks before
    it; closing this generator cancels the reading task and closes ``chunks``."""
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def read() -> None:
        try:
            async for chunk in chunks:
                queue.put_nowait(chunk)
        except Exception as exc:  # noqa: BLE001  (any error of the stream is the reader's, in order)
            queue.put_nowait(exc)
        queue.put_nowait(_END)

    reader = asyncio.ensure_future(read())
    try:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            for chunk in merge_chunks([c for c in items if isinstance(c, SampleChunk)]):
                yield chunk
            failed = next((x for x in items if isinstance(x, Exception)), None)
            if failed is not None:
                raise failed
            if items[-1] is _END:
                return
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
