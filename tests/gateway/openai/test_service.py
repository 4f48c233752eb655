"""``OpenAIService``'s stream parts on real async generators and the tiny policy's tokenizer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from policy_server.gateway.llm.service import LLMService
from policy_server.gateway.openai.service import _merged, _TextStream
from policy_server.llm.params import GenerationParams, SampleChunk
from policy_server.schema.llm import LLMPolicySpec


async def _numbers(start: int, closed: list[int], fail_at: int | None = None) -> AsyncIterator[int]:
    try:
        for i in range(start, start + 1000):
            if i == fail_at:
                raise ValueError(f"failed at {i}")
            await asyncio.sleep(0)
            yield i
    finally:
        closed.append(start)


def test_merged_streams_interleave_and_closing_early_closes_every_stream() -> None:
    closed: list[int] = []

    async def take() -> list[tuple[int, int]]:
        merged = _merged([_numbers(0, closed), _numbers(5000, closed)])
        got = []
        async for item in merged:
            got.append(item)
            if len(got) == 6:
                break
        await merged.aclose()  # what Starlette does when the client disconnects
        return got

    got = asyncio.run(take())
    assert {which for which, _ in got} == {0, 1} and sorted(closed) == [0, 5000]


def test_merged_streams_raise_a_streams_error_and_close_the_others() -> None:
    closed: list[int] = []

    async def drain() -> None:
        async for _ in _merged([_numbers(0, closed), _numbers(100, closed, fail_at=103)]):
            pass

    with pytest.raises(ValueError, match="failed at 103"):
        asyncio.run(drain())
    assert sorted(closed) == [0, 100]


@pytest.fixture(scope="module")
def llm(llm_dirs: dict[str, Path]) -> LLMService:
    spec = LLMPolicySpec(path=llm_dirs["policy"], engine="transformers")
    return LLMService(spec, AutoTokenizer.from_pretrained(str(llm_dirs["policy"])))


def _chunk(llm: LLMService, text: str, finish: bool = False, stop: str | None = None) -> SampleChunk:
    ids = llm.encode(text, special=False)
    return SampleChunk(0, ids, [0.0] * len(ids), None, "stop" if finish else None, stop, 0)


def test_text_stream_holds_back_what_may_become_a_stop_string(llm: LLMService) -> None:
    params = GenerationParams(stop_strings=("END",))
    text = _TextStream(llm, params, False)
    assert text.add(_chunk(llm, "one E")) == "one "
    assert text.add(_chunk(llm, "ND", finish=True, stop="END")) == ""
    other = _TextStream(llm, params, False)
    assert other.add(_chunk(llm, "one E")) + other.add(_chunk(llm, "at")) == "one Eat"


@pytest.mark.parametrize(
    ("field", "named"),
    [("structured", "body.response_format"), ("logit_bias", "body.logit_bias"), ("max_new_tokens", "body.max_tokens"),
     ("stop_strings.1", "body.stop.1"), ("body.response_format", "body.response_format")],
)
def test_an_engines_refusal_is_named_as_the_openai_request_named_it(field: str, named: str) -> None:
    from policy_server.errors import InvalidRequest
    from policy_server.gateway.openai.service import _openai_named

    renamed = _openai_named(InvalidRequest.at(field, "cannot"))
    assert renamed.fields[0].field == named and renamed.message == f"{named}: cannot"


def test_a_requests_model_picks_the_adapter_in_one_place(llm_dirs: dict[str, Path]) -> None:
    """The policy's id (or none) is the policy, an adapter's id that adapter, any other id a 404;
    completions and chat take ``model`` alike."""
    from policy_server.errors import ModelNotFound, NotFound
    from policy_server.gateway.openai.service import OpenAIService
    from policy_server.gateway.openai.wire import ChatRequest, CompletionRequest

    spec = LLMPolicySpec(path=llm_dirs["policy"], served_name="tiny", adapters={"tiny-a": llm_dirs["policy_lora"]})
    service = OpenAIService(LLMService(spec, AutoTokenizer.from_pretrained(str(llm_dirs["policy"]))))
    assert [(m["id"], m["parent"]) for m in service.models()] == [("tiny", None), ("tiny-a", "tiny")]
    for model, adapter in [(None, None), ("tiny", None), ("tiny-a", "tiny-a")]:
        assert service.completion_prompts(CompletionRequest(prompt="Hi", model=model))[0].params.adapter == adapter
        chat = ChatRequest(messages=[{"role": "user", "content": "Hi"}], model=model)  # type: ignore[list-item]
        assert service.chat_prompt(chat).params.adapter == adapter
    for unknown in ("tiny-b", "policy", "TINY-A"):
        with pytest.raises(ModelNotFound, match=f"the model '{unknown}' does not exist; this server serves 'tiny', 'tiny-a'"):
            service.completion_prompts(CompletionRequest(prompt="Hi", model=unknown))
        with pytest.raises(NotFound):
            service.model(unknown)
