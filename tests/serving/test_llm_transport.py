"""The direct data path of LLM streams: the codec, then a real TCP server on loopback over the
in-process transformers engine (no Ray)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import pytest

from policy_server import errors
from policy_server.errors import FieldError, InvalidRequest, ModelError, PolicyServerError, QueueFull
from policy_server.llm.chunks import merge_chunks
from policy_server.llm.params import GenerationParams, SampleChunk, StructuredOutput
from policy_server.serving.llm_transport import (
    END,
    MAGIC,
    DirectLLMStreams,
    LLMStreamServer,
    decode_chunks,
    decode_error,
    decode_request,
    encode_chunks,
    encode_error,
    encode_request,
    engine_streams,
    unpack,
)

TOKEN = "cd" * 32


def message(data: bytes) -> Any:
    """The message of one encoded frame (its length prefix checked)."""
    assert int.from_bytes(data[:4], "little") == len(data) - 4
    return unpack(data[4:])


# --- codec -----------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [
    GenerationParams(),
    GenerationParams(num_samples=3, temperature=1.3, top_p=0.9, max_new_tokens=17, min_new_tokens=2,
                     stop_strings=("\n", "END"), seed=5, top_logprobs=4, prompt_logprobs=True,
                     presence_penalty=0.5, frequency_penalty=-1.0, logit_bias=((3, 2.5), (7, -100.0)),
                     structured=StructuredOutput("json_schema", '{"type": "object"}'), adapter="lora-a"),
    GenerationParams(num_samples=4, strategy="diverse_beam_search", num_beam_groups=2, diversity_penalty=0.25,
                     safe_logits=True, structured=StructuredOutput("json_object")),
])
def test_a_request_round_trips_exactly(params: GenerationParams) -> None:
    prompt_ids, decoded = decode_request(message(encode_request([1, 2, 3], params)))
    assert prompt_ids == [1, 2, 3] and decoded == params


@pytest.mark.parametrize("bad", [
    ["not ids", {}], [[1.5], {}], [[1], "params"], [[1], {"no_such_field": 1}], [[1], {"temperature": -1.0}],
])
def test_a_malformed_request_is_refused_by_the_codec(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        decode_request(bad)


def test_chunks_round_trip_with_their_top_logprobs() -> None:
    chunks = [
        SampleChunk(0, [5, 6], [-0.5, -1.25], [{5: -0.5, 9: -2.0}, {6: -1.25, 1: -3.5}], None, None, 3),
        SampleChunk(1, [7], [-0.125], None, "stop", "\n", 4),
    ]
    kind, items = message(encode_chunks(chunks))
    assert kind == 0 and decode_chunks(items) == chunks


def _instance(cls: type[PolicyServerError]) -> PolicyServerError:
    if issubclass(cls, InvalidRequest):
        return cls("body.max_tokens: too many", [FieldError("max_tokens", "too many"), FieldError("n", "bad")])
    if issubclass(cls, QueueFull):
        return cls("the wait list is full", retry_after_s=7)
    return cls(f"a {cls.__name__} happened")


ERROR_CLASSES = sorted(
    (c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, PolicyServerError)),
    key=lambda c: c.__name__,
)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_class_arrives_as_itself(cls: type[PolicyServerError]) -> None:
    sent = _instance(cls)
    got = decode_error(*message(encode_error(sent))[1:])
    assert type(got) is cls
    assert (got.message, got.fields, got.status, got.code, got.retry_after_s, got.args) == (
        sent.message, sent.fields, sent.status, sent.code, sent.retry_after_s, sent.args)


def test_another_exception_is_a_model_error_naming_it() -> None:
    got = decode_error(*message(encode_error(ValueError("the prompt is empty")))[1:])
    assert type(got) is ModelError and "ValueError: the prompt is empty" in got.message


@pytest.mark.parametrize("name", ["ValueError", "FieldError", "summary", "os.system", "__builtins__"])
def test_a_name_that_is_not_one_of_our_errors_is_never_rebuilt(name: str) -> None:
    got = decode_error(name, "rm -rf /", [], None)
    assert type(got) is ModelError and name in got.message


# --- server and client on the in-process engine ----------------------------------------------


class Recorded:
    """The engine's streams, noting how many were opened and closed (the engine then aborts)."""

    def __init__(self, engine: Any) -> None:
        self.streams, _ = engine_streams(engine)
        self.opened = 0
        self.closed = threading.Event()

    async def __call__(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        self.opened += 1
        try:
            async with aclosing(self.streams(prompt_ids, params)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self.closed.set()


@pytest.fixture()
def recorded(policy_engine: Any) -> Recorded:
    return Recorded(policy_engine)


@pytest.fixture()
def server(recorded: Recorded) -> Iterator[LLMStreamServer]:
    srv = LLMStreamServer(recorded, TOKEN, "127.0.0.1")
    yield srv
    srv.close()


def client(endpoints: list[tuple[str, int, str]]) -> tuple[DirectLLMStreams, list[int]]:
    """A gateway side over ``endpoints``; its fallback yields one chunk and notes the call."""
    used: list[int] = []

    async def listed() -> list[tuple[str, int, str]]:
        return list(endpoints)

    async def fallback(prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        used.append(len(prompt_ids))
        yield SampleChunk(0, [0], [0.0], None, "length", None, -1)

    return DirectLLMStreams(listed, fallback), used


async def collect(streams: DirectLLMStreams, prompt_ids: list[int], params: GenerationParams) -> list[SampleChunk]:
    async with aclosing(streams.stream(prompt_ids, params)) as chunks:
        return [chunk async for chunk in chunks]


def test_streams_equal_the_engines_samples_and_reuse_one_connection(
    server: LLMStreamServer, policy_engine: Any
) -> None:
    streams, used = client([(*server.address, TOKEN)])
    params = GenerationParams(num_samples=2, temperature=0, max_new_tokens=6, top_logprobs=2)

    async def run() -> tuple[list[SampleChunk], list[SampleChunk], Any]:
        first = await collect(streams, [1, 2, 3], params)
        second = await collect(streams, [1, 2, 3], params)
        return first, second, await policy_engine.generate([1, 2, 3], params)

    first, second, (samples, _) = asyncio.run(run())
    for index, sample in enumerate(samples):
        mine = [c for c in first if c.index == index]
        assert [t for c in mine for t in c.token_ids] == sample.completion_ids
        assert [t for c in mine for t in c.top_logprobs or []] == pytest.approx(sample.top_logprobs)
        assert mine[-1].finish_reason == sample.finish_reason
    assert merge_chunks(second) == merge_chunks(first)  # greedy (chunk boundaries follow the reader's pace)
    assert (streams.direct, streams.fallbacks, used) == (2, 0, [])
    assert sum(len(conns) for conns in streams._idle.values()) == 1


def test_an_engine_refusal_arrives_as_the_same_error(server: LLMStreamServer) -> None:
    streams, _ = client([(*server.address, TOKEN)])
    params = GenerationParams(structured=StructuredOutput("json_object"), max_new_tokens=4)

    async def run() -> list[SampleChunk]:
        with pytest.raises(InvalidRequest) as refused:
            await collect(streams, [1, 2], params)
        assert refused.value.status == 422 and [f.field for f in refused.value.fields] == ["structured"]
        return await collect(streams, [1, 2], GenerationParams(max_new_tokens=2))

    assert len(asyncio.run(run())) >= 1  # the connection stays usable after an error
    assert (streams.direct, streams.fallbacks) == (2, 0)
    assert sum(len(conns) for conns in streams._idle.values()) == 1


def test_a_wrong_token_is_refused_and_the_handle_serves(server: LLMStreamServer, recorded: Recorded) -> None:
    streams, used = client([(*server.address, "ef" * 32)])
    got = asyncio.run(collect(streams, [4, 5], GenerationParams(max_new_tokens=3)))
    assert got == [SampleChunk(0, [0], [0.0], None, "length", None, -1)]
    assert (streams.fallbacks, used, recorded.opened) == (1, [2], 0)
    with socket.create_connection(server.address, timeout=10) as raw:  # the server closes without a word
        raw.sendall(MAGIC + bytes.fromhex("ef" * 32) + b"\x05\x00\x00\x00junk!")
        assert raw.recv(100) == b""


def test_a_reader_that_leaves_cancels_the_generation(server: LLMStreamServer, recorded: Recorded) -> None:
    streams, _ = client([(*server.address, TOKEN)])

    async def first_chunk_then_leave() -> SampleChunk:
        async with aclosing(streams.stream([1, 2, 3], GenerationParams(max_new_tokens=200))) as chunks:
            return await anext(chunks)

    first = asyncio.run(first_chunk_then_leave())
    assert first.finish_reason is None
    assert recorded.closed.wait(30), "the replica kept generating for a reader that left"
    assert sum(len(conns) for conns in streams._idle.values()) == 0  # that connection is gone


def test_a_restarted_replica_is_found_again(recorded: Recorded) -> None:
    old = LLMStreamServer(recorded, TOKEN, "127.0.0.1")
    endpoints = [(*old.address, TOKEN)]
    streams, used = client(endpoints)
    params = GenerationParams(temperature=0, max_new_tokens=3)

    async def run() -> tuple[list[SampleChunk], list[SampleChunk], list[SampleChunk]]:
        before = await collect(streams, [1, 2], params)
        old.close()
        new = LLMStreamServer(recorded, TOKEN, "127.0.0.1")
        endpoints[:] = [(*new.address, TOKEN)]
        try:
            await asyncio.sleep(0.2)
            during = await collect(streams, [1, 2], params)  # the old replica refuses: re-listed, the new one
            after = await collect(streams, [1, 2], params)
        finally:
            new.close()
        return before, during, after

    before, during, after = asyncio.run(run())
    # chunk boundaries depend on how fast the reader is (coalesced): the samples they add up to do not
    assert merge_chunks(during) == merge_chunks(before) == merge_chunks(after) and used == []
    assert (streams.direct, streams.fallbacks) == (3, 0)


def test_the_end_frame_is_what_the_server_sends_last(server: LLMStreamServer) -> None:
    with socket.create_connection(server.address, timeout=30) as raw:
        raw.sendall(MAGIC + bytes.fromhex(TOKEN) + encode_request([1, 2], GenerationParams(max_new_tokens=2)))
        data = b""
        while not data.endswith(b"\x91" + bytes([END])):  # msgpack [1]
            part = raw.recv(65536)
            assert part, "the server closed before the end frame"
            data += part


async def _no_streams(prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
    yield SampleChunk(0, [1], [0.0], None, "length", None, 0)


def test_a_peer_that_never_says_hello_is_dropped_and_connections_over_the_cap_at_once() -> None:
    srv = LLMStreamServer(_no_streams, TOKEN, "127.0.0.1", max_connections=1, hello_timeout_s=0.3)
    try:
        with socket.create_connection(srv.address, timeout=5) as silent:
            with socket.create_connection(srv.address, timeout=5) as extra:
                assert extra.recv(16) == b""  # over the cap of 1: closed at once
            assert silent.recv(16) == b""  # no hello within 0.3 s: closed (a 5 s wait would fail)
    finally:
        srv.close()
