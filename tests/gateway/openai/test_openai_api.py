"""OpenAI's routes on the tiny LLM policy, through FastAPI's TestClient and the real `openai` client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import API_KEY, CHAT_BODY, llm_schema, make_client, post_raw
from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def client(llm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    schema = llm_schema(llm_dirs)
    schema["llm"]["policy"]["engine"] = "transformers"
    with make_client(tmp_path_factory.mktemp("openai"), schema) as c:
        yield c


def assert_400_naming(answer: Any, param: str) -> dict[str, Any]:
    """OpenAI's error shape, naming the field as the request named it."""
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error


def test_openai_routes_refuse_an_unknown_model_and_no_messages(client: TestClient) -> None:
    unknown = client.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert unknown.status_code == 404 and "tiny" in unknown.json()["error"]["message"]
    assert_400_naming(client.post("/v1/chat/completions", json={"messages": []}), "messages")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/completions", {"prompt": "Hi", "temperature": 1e39}, "temperature"),
        ("/v1/completions", {"prompt": "Hi", "top_p": float("nan")}, "top_p"),
        ("/v1/chat/completions", CHAT_BODY | {"temperature": float("inf")}, "temperature"),
        ("/v1/completions", {"prompt": "Hi", "n": 99}, "n"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 10**30}, "max_tokens"),
        ("/v1/completions", {"prompt": "Hi", "presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"prompt": "Hi", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": "Hi", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        ("/v1/completions", {"prompt": "Hi", "best_of": 2}, "best_of"),
        ("/v1/completions", {"prompt": ["Hi", "\ud800"]}, "prompt"),
        ("/v1/chat/completions", CHAT_BODY | {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("/v1/chat/completions", CHAT_BODY | {"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
    ],
)
def test_openai_numbers_are_checked_at_float32_and_named(
    client: TestClient, path: str, body: dict[str, Any], field: str
) -> None:
    assert_400_naming(post_raw(client, path, body), field)


def test_openai_routes_keep_openais_leniency(client: TestClient) -> None:
    lenient = {"prompt": "Hi", "max_tokens": "4", "n": "1", "echo": "false", "user": "someone", "seed": 3}
    answer = post_raw(client, "/v1/completions", lenient)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["choices"]) == 1 and answer.json()["usage"]["completion_tokens"] <= 4


def test_openai_routes_document_every_status_they_answer_and_their_answers(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, method, answer in [("/v1/models", "get", "ModelList"), ("/v1/completions", "post", "Completion"),
                                 ("/v1/chat/completions", "post", "ChatCompletion")]:
        responses = paths[path][method]["responses"]
        assert {"200", "400", "401", "404", "429", "500", "503"} <= set(responses), (path, sorted(responses))
        assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith(f"/{answer}")
    nameless = client.post("/v1/completions", json={"prompt": "Hi", "model": ""})
    assert nameless.status_code == 404 and set(nameless.json()["error"]) == {"message", "type", "param", "code"}
    keyless = client.post("/v1/completions", json={"prompt": "Hi"}, headers={"access-token": "", "authorization": "Bearer nope"})
    assert keyless.status_code == 401


def test_openai_answers_hold_to_their_models(client: TestClient) -> None:
    from policy_server.gateway.openai.wire import ChatCompletion, Completion, ModelList

    ModelList.model_validate(client.get("/v1/models").json())
    completion = Completion.model_validate(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3,
                                                                               "logprobs": 1, "n": 2}).json())
    assert len(completion.choices) == 2 and completion.choices[0].logprobs is not None
    chat = ChatCompletion.model_validate(post_raw(client, "/v1/chat/completions", CHAT_BODY | {"logprobs": True}).json())
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].logprobs is not None


def test_the_openai_client_gets_a_400_for_a_temperature_beyond_float32(client: TestClient) -> None:
    with openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=API_KEY, max_retries=0, http_client=client) as oai, \
            pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=1e39)
    assert caught.value.status_code == 400 and "temperature" in caught.value.message
    assert caught.value.body["param"] == "temperature"  # type: ignore[index]
