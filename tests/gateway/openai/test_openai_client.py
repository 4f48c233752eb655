"""OpenAI's API through the real `openai` client against a real uvicorn server, on each engine."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from conftest import API_KEY, llm_schema, running_server, vllm_adapters
from support import wait_until

from policy_server.settings import Settings

ENGINES = ["transformers", "vllm"]
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, engine: str, llm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a server of the tiny policy on ``engine`` (local backend; the vLLM one is
    the session's)."""
    from policy_server.gateway.app import build_app

    if engine == "vllm":
        yield request.getfixturevalue("vllm_server")
        return
    schema = llm_schema(llm_dirs)
    schema["llm"]["policy"]["engine"] = engine
    path = tmp_path_factory.mktemp(f"openai-{engine}") / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    with running_server(build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0))) as url:
        yield url


@pytest.fixture()
def oai(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


def test_chat_streams_deltas_that_add_up_to_the_answer_and_a_usage_chunk(oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, stream=True, stream_options={"include_usage": True},
        seed=5, temperature=1.0, n=2,
    ))
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    by_choice: dict[int, list[Any]] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            by_choice[choice.index].append(choice)
    tokens = 0
    for choices in by_choice.values():
        assert choices[0].delta.role == "assistant" and choices[-1].finish_reason in ("stop", "length")
        assert all(c.finish_reason is None for c in choices[:-1])
        tokens += sum(len(c.model_extra["token_ids"]) for c in choices)
    assert usage.usage.completion_tokens == tokens and usage.usage.prompt_tokens > 0
    whole = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, seed=5, temperature=1.0, n=2)
    for choice in whole.choices:  # the same seed: the streamed text is the whole answer's
        assert "".join(c.delta.content or "" for c in by_choice[choice.index]) == choice.message.content


def test_completions_stream_and_the_text_excludes_the_stop_string(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model="tiny", prompt="Once", max_tokens=12, temperature=0)
    ids = whole.choices[0].model_extra["token_ids"]
    assert len(ids) >= 2
    stop = oai.completions.create(model="tiny", prompt="Once", max_tokens=1, temperature=0, echo=False).choices[0].text
    pieces = list(oai.completions.create(model="tiny", prompt="Once", max_tokens=12, temperature=0, stream=True,
                                         logprobs=2))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert [t for p in pieces for t in p.choices[0].model_extra["token_ids"]] == ids
    streamed = [lp for p in pieces for lp in p.choices[0].logprobs.token_logprobs]
    assert len(streamed) == len(ids) and all(lp <= 0 for lp in streamed)
    if stop:  # the first token's text as a stop string ends the completion before it
        stopped = oai.completions.create(model="tiny", prompt="Once", max_tokens=12, temperature=0, stop=[stop, "zz"])
        assert stopped.choices[0].text == "" and stopped.choices[0].finish_reason == "stop"


def test_completion_logprobs_give_k_alternatives_and_offsets_into_the_text(oai: openai.OpenAI, llm_dirs: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    special = set(AutoTokenizer.from_pretrained(str(llm_dirs["policy"])).all_special_tokens)  # not in the text
    answer = oai.completions.create(model="tiny", prompt="Once upon", max_tokens=6, logprobs=3, temperature=1.0, seed=1)
    choice = answer.choices[0]
    lp = choice.logprobs
    assert lp is not None and len(lp.tokens) == len(choice.model_extra["token_ids"]) == len(lp.token_logprobs)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) >= 3 - 1 and all(v <= 0 for v in top.values())  # distinct ids may decode alike
        assert logprob <= 0 and max(top.values()) >= logprob - 1e-5
    for token, offset in zip(lp.tokens, lp.text_offset):
        if offset + len(token) <= len(choice.text) and token not in special:
            assert choice.text[offset: offset + len(token)] == token


def refused_on_cpu_lora(oai: openai.OpenAI, **asked: Any) -> None:
    """The session's vLLM engine serves LoRA adapters on CPU: there, vLLM's LoRA kernel kills the
    engine core on a batch that computes prompt log-probs (n=2 did), so echo with logprobs is a 400
    naming `echo`, and the engine goes on serving."""
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(**asked)
    assert refused.value.body["param"] == "echo" and "LoRA" in refused.value.body["message"]
    assert oai.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices[0].finish_reason == "length"


def test_echo_returns_the_prompt_with_its_logprobs_first_one_null(oai: openai.OpenAI, engine: str) -> None:
    prompt = "Once upon a time"
    if engine == "vllm":
        refused_on_cpu_lora(oai, model="tiny", prompt=prompt, max_tokens=4, logprobs=2, echo=True, n=2)
        return
    choice = oai.completions.create(model="tiny", prompt=prompt, max_tokens=4, logprobs=2, echo=True, temperature=0).choices[0]
    prompt_ids = choice.model_extra["prompt_token_ids"]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert lp is not None and len(lp.tokens) == len(prompt_ids) + len(choice.model_extra["token_ids"])
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.top_logprobs[0] is None
    prompt_tops = lp.top_logprobs[1:len(prompt_ids)]
    # the 2 alternatives asked for, then the prompt's own token when it is not one of them (fewer
    # keys where distinct ids decode alike)
    assert all(1 <= len(top) <= 3 and max(top.values()) >= logprob - 1e-5
               for top, logprob in zip(prompt_tops, lp.token_logprobs[1:]))
    assert sum(len(top) >= 2 for top in prompt_tops) >= len(prompt_tops) - 1
    for token, offset in zip(lp.tokens[1:], lp.text_offset[1:]):
        if offset + len(token) <= len(choice.text):
            assert choice.text[offset: offset + len(token)] == token


def test_streamed_echo_with_logprobs_equals_the_whole_answer(oai: openai.OpenAI, engine: str) -> None:
    """The prompt (text, tokens, log-probs, offsets) comes first in a chunk of its own per choice,
    then the completion; put together they equal the answer without ``stream`` (the transformers
    engine here; the session's vLLM engine refuses echo with logprobs: see ``refused_on_cpu_lora``)."""
    prompt = "Once upon a time"
    if engine == "vllm":
        refused_on_cpu_lora(oai, model="tiny", prompt=prompt, max_tokens=4, logprobs=2, echo=True, n=2, stream=True)
        return
    asked: dict[str, Any] = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "logprobs": 2, "echo": True,
                             "n": 2, "seed": 7}
    whole = oai.completions.create(**asked)
    chunks = list(oai.completions.create(**asked, stream=True))
    prompt_ids = whole.choices[0].model_extra["prompt_token_ids"]
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        first = mine[0]
        assert first.text == prompt and len(first.logprobs.tokens) == len(prompt_ids) and first.finish_reason is None
        assert first.logprobs.token_logprobs[0] is None and first.logprobs.text_offset[0] == 0
        assert "".join(c.text for c in mine) == choice.text
        want = choice.logprobs
        assert [t for c in mine for t in c.logprobs.tokens] == want.tokens
        assert [o for c in mine for o in c.logprobs.text_offset] == want.text_offset
        got = [x for c in mine for x in c.logprobs.token_logprobs]
        assert got[0] is None and want.token_logprobs[0] is None
        assert got[1:] == pytest.approx(want.token_logprobs[1:], abs=1e-5)
        tops = [t for c in mine for t in c.logprobs.top_logprobs]
        assert len(tops) == len(want.top_logprobs)
        for top, wanted in zip(tops[1:], want.top_logprobs[1:]):
            assert top.keys() == wanted.keys() and list(top.values()) == pytest.approx(list(wanted.values()), abs=1e-5)
        assert mine[-1].finish_reason == choice.finish_reason


def test_chat_logprobs_give_top_logprobs_entries(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=4)
    content = answer.choices[0].logprobs.content
    assert content and len(content) == len(answer.choices[0].model_extra["token_ids"])
    for entry in content:
        assert len(entry.top_logprobs) == 4 and entry.bytes == list(entry.token.encode())
        assert all(math.isfinite(t.logprob) for t in entry.top_logprobs)
    assert answer.model_extra["prompt_token_ids"]


def test_sampling_fields_are_accepted(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(
        model="tiny", messages=MESSAGES, max_completion_tokens=6, presence_penalty=1.5, frequency_penalty=-0.5,
        logit_bias={"5": 100.0}, seed=3, stop="\n\n", n=2, extra_body={"min_tokens": 2},
    )
    assert len(answer.choices) == 2
    for choice in answer.choices:  # a +100 bias: token 5 (and at least min_tokens tokens)
        assert choice.model_extra["token_ids"][0] == 5 and len(choice.model_extra["token_ids"]) >= 2


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    return exc.response.json()["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 99}, "n"),
        ({"temperature": 1e39}, "temperature"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {"word": 1}}, "logit_bias.word"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a", ""]}, "stop.1"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"messages": [{"role": "user", "content": "Hi", "name": "x"}]}, "messages.0.name"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ],
)
def test_bad_fields_get_openais_400_naming_them_as_sent(server: str, body: dict[str, Any], param: str) -> None:
    payload = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 4} | body)
    answer = httpx.post(f"{server}/v1/chat/completions", content=payload,
                        headers={"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param), error


def test_the_client_sees_a_bad_request_naming_max_tokens(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model="tiny", prompt="Hi", max_tokens=10**6)
    assert _error(caught.value)["param"] == "max_tokens" and "max_tokens" in caught.value.message


def test_json_schema_is_followed_or_refused_by_an_engine_without_it(oai: openai.OpenAI, engine: str) -> None:
    # an enum: the tiny model's free integers run past any token limit
    schema = {"type": "object", "properties": {"a": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["a"]}
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    if engine == "transformers":  # it has no structured outputs: a 400 that says so
        with pytest.raises(openai.BadRequestError) as caught:
            oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, response_format=fmt)
        assert "transformers" in caught.value.message and _error(caught.value)["param"] == "response_format"
    else:
        answer = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=48, response_format=fmt)
        assert json.loads(answer.choices[0].message.content or "")["a"] in (1, 2, 3)


def test_models_and_one_model_and_an_unknown_one(oai: openai.OpenAI, engine: str, llm_dirs: dict[str, Path]) -> None:
    adapters = list(vllm_adapters(llm_dirs)) if engine == "vllm" else []  # the shared server's (test_adapters.py)
    assert [m.id for m in oai.models.list().data] == ["tiny", *adapters]
    assert oai.models.retrieve("tiny").id == "tiny"
    unknown: list[Callable[[], Any]] = [
        lambda: oai.models.retrieve("gpt-9"),
        lambda: oai.chat.completions.create(model="gpt-9", messages=MESSAGES),  # type: ignore[arg-type]
        lambda: oai.completions.create(model="gpt-9", prompt="Hi"),
        lambda: oai.chat.completions.create(model="tiny-lora-z", messages=MESSAGES, stream=True),  # type: ignore[arg-type]
    ]
    for call in unknown:  # OpenAI's own answer to a model it does not have
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.code == "model_not_found" and caught.value.param == "model"
        assert caught.value.type == "invalid_request_error" and "does not exist" in caught.value.message
        assert set(_error(caught.value)) == {"message", "type", "param", "code"}


def test_a_wrong_key_is_openais_401(server: str) -> None:
    with openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0) as client, \
            pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert _error(caught.value)["type"] == "authentication_error"


def test_errors_off_v1_keep_our_envelope(server: str) -> None:
    answer = httpx.post(f"{server}/llm/direct_forward", json={"input_string": "Hi", "frobnicate": 1},
                        headers={"access-token": API_KEY})
    assert answer.status_code == 422 and answer.json()["error"]["fields"][0]["field"] == "body.frobnicate"


def test_a_temperature_one_engine_takes_and_vllm_refuses_is_a_422_naming_it(engine: str, server: str) -> None:
    """x1's routes allow temperatures up to 10; vLLM's sampler takes up to 2."""
    answer = httpx.post(f"{server}/llm/direct_forward", json={"input_string": "Hi", "temperature": 5.0,
                                                              "max_output_length": 8},
                        headers={"access-token": API_KEY}, timeout=120)
    if engine == "transformers":
        assert answer.status_code == 200, answer.text
    else:
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["fields"][0]["field"] == "body.temperature"


STEP = 2
"""The tiny tokenizer's id of its step token `<|eois_id|>`, a special token."""


def test_special_tokens_leave_the_text_unless_skip_special_tokens_is_false(oai: openai.OpenAI) -> None:
    """vLLM's default and extension field: the text skips special tokens; token ids and log-prob
    tokens keep them."""
    forced: dict[str, Any] = {"max_tokens": 3, "stop": "zzz", "logit_bias": {str(STEP): 100}, "logprobs": 1}
    kept = {"skip_special_tokens": False}
    plain = oai.completions.create(model="tiny", prompt="Hi", **forced)
    spelled = oai.completions.create(model="tiny", prompt="Hi", extra_body=kept, **forced)
    for answer in (plain, spelled):
        choice = answer.choices[0]
        assert choice.model_extra["token_ids"] == [STEP] * 3
        assert choice.logprobs is not None and choice.logprobs.tokens == ["<|eois_id|>"] * 3
    assert plain.choices[0].text == "" and plain.choices[0].logprobs.text_offset == [0, 0, 0]  # type: ignore[union-attr]
    assert spelled.choices[0].text == "<|eois_id|>" * 3 and spelled.choices[0].logprobs.text_offset == [0, 11, 22]  # type: ignore[union-attr]
    streamed = oai.completions.create(model="tiny", prompt="Hi", stream=True, extra_body=kept, **forced)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "<|eois_id|>" * 3
    chat: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stop": "zzz",
                            "logit_bias": {str(STEP): 100}}
    assert oai.chat.completions.create(**chat).choices[0].message.content == ""
    assert oai.chat.completions.create(**chat, extra_body=kept).choices[0].message.content == "<|eois_id|>" * 3
    chunks = oai.chat.completions.create(**chat, stream=True, extra_body=kept)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "<|eois_id|>" * 3
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model="tiny", prompt="Hi", max_tokens=1, extra_body={"skip_special_tokens": "maybe"})
    assert _error(caught.value)["param"] == "skip_special_tokens"


def test_a_queued_forward_with_a_temperature_vllm_refuses_is_refused_at_submit(engine: str, server: str) -> None:
    """x1's routes allow temperatures up to 10; vLLM's sampler takes up to 2: the vLLM engine's
    queued task is refused when submitted, as direct_forward is, not failed when fetched."""
    headers = {"access-token": API_KEY}
    for temperature in (5.0, 2.5, 10.0):
        body = {"question": "Hi", "temperature": temperature, "max_output_length": 64}
        answer = httpx.post(f"{server}/llm/forward", json=body, headers=headers, timeout=120)
        if engine == "transformers":
            assert answer.status_code == 201, answer.text
            task = answer.json()["task_id"]
            fetched = wait_fetched(server, task)
            assert fetched.status_code == 200 and fetched.json()["result"], fetched.text
        else:
            assert answer.status_code == 422, answer.text
            error = answer.json()["error"]
            assert error["fields"][0]["field"] == "body.temperature" and "vLLM" in error["message"], error
    answer = httpx.post(f"{server}/llm/forward", json={"question": "Hi", "temperature": 2.0, "max_output_length": 64},
                        headers=headers, timeout=120)
    assert answer.status_code == 201, answer.text
    assert wait_fetched(server, answer.json()["task_id"]).status_code == 200


def wait_fetched(server: str, task_id: str) -> httpx.Response:
    """The task's answer once it is no longer pending."""
    answer: httpx.Response | None = None

    def done() -> bool:
        nonlocal answer
        answer = httpx.get(f"{server}/llm/forward/{task_id}", headers={"access-token": API_KEY}, timeout=120)
        return answer.status_code != 202

    wait_until(done, timeout=120)
    assert answer is not None
    return answer
