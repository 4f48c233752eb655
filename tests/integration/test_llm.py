"""The LLM policy and value model on real Ray Serve, behind a real uvicorn; the real `openai` client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from conftest import API_KEY, running_server
from support import live_actors, wait_until

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}


@pytest.fixture(scope="module")
def app(ray_session: int, llm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    schema = {
        "parameters": {"api_key": API_KEY},
        "llm": {
            "policy": {"path": str(llm_dirs["policy"]), "adapter": str(llm_dirs["policy_lora"]), "served_name": "tiny",
                       "engine": "transformers",
                       "resources": {"num_cpus": 0.5}, "limits": {"max_new_tokens": 64}},
            "value": {"path": str(llm_dirs["value"]), "resources": {"num_cpus": 0.5}},
        },
    }
    path = tmp_path_factory.mktemp("llm-serve") / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    settings = Settings(schema_path=path, gateway_metrics_port=0, serve_app_prefix="it-llm")
    return build_app(settings)


@pytest.fixture(scope="module")
def server(app: Any) -> Iterator[str]:
    with running_server(app) as url:
        yield url


@pytest.fixture()
def oai(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


def test_the_openai_client_lists_the_model_and_completes(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list().data] == ["tiny"]
    completion = oai.completions.create(model="tiny", prompt="What is 2 + 3?", n=2, max_tokens=8, temperature=0.8,
                                        logprobs=1, seed=0)
    assert len(completion.choices) == 2 and completion.usage.completion_tokens > 0
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) > 0


def test_the_openai_client_chats_with_logprobs_and_stop(oai: openai.OpenAI) -> None:
    chat = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Sort these letters: b a"}],
        max_tokens=12, temperature=0.5, top_p=0.9, stop=["\n"], logprobs=True,
    )
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and "\n" not in choice.message.content
    assert all(item.logprob <= 0 for item in choice.logprobs.content)


def test_the_openai_client_streams_through_the_serve_deployment(oai: openai.OpenAI, app: Any) -> None:
    """Chunks come straight from the replica's direct port (serving.llm_transport), never through
    the streaming handle's fallback."""
    direct = app.state.llm.policy.backend.direct
    streamed = direct.direct
    chunks = list(oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    whole = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                        temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert (direct.direct - streamed, direct.fallbacks) == (1, 0)


def test_the_openai_client_is_refused_with_a_wrong_key(server: str) -> None:
    with openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_sixteen_concurrent_direct_forwards_all_answer(server: str) -> None:
    def one(i: int) -> Any:
        body = {"input_string": f"What is {i} + 1?", "max_output_length": 40, "seed": i, "return_tokens": True}
        return httpx.post(f"{server}/llm/direct_forward", json=body, headers=AUTH, timeout=120)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    assert [a.status_code for a in answers] == [200] * 16
    assert all(a.json()["records"][0]["model_version"] == 0 for a in answers)


def test_value_model_over_serve(server: str) -> None:
    conv = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    answer = httpx.post(f"{server}/value/forward", json={"messages": [conv, conv]}, headers=AUTH, timeout=60)
    assert answer.status_code == 200, answer.text
    scores = answer.json()["result"]
    assert len(scores) == 2 and scores[0] == pytest.approx(scores[1], abs=1e-5) and -1 <= scores[0] <= 1


def test_queued_tasks_and_sessions_live_in_their_own_deployment(server: str) -> None:

    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as client:
        task_id = client.post("/llm/forward", json={"question": "What is 4 + 4?", "num_samples": 2}).json()["task_id"]

        def done() -> httpx.Response | None:
            answer = client.get(f"/llm/forward/{task_id}")
            return None if answer.status_code == 202 else answer

        answer = wait_until(done, 60, message="the queued forward never finished")
        assert answer.status_code == 200 and len(answer.json()["result"]) == 2
        assert client.get(f"/llm/forward/{task_id}").status_code == 404  # fetched once, then forgotten
        first = client.post("/llm/direct_forward", json={"input_string": "Hi", "session_id": "it-s",
                                                         "return_tokens": True, "skip_special_tokens": False}).json()
        nodes = client.get("/llm/sessions/it-s").json()["nodes"]
        assert nodes[0]["tokens"] == first["records"][0]["tokens"]
        assert client.delete("/llm/sessions/it-s").status_code == 200
        assert client.get("/llm/sessions/it-s").status_code == 404


OPENAI_BAD_INPUTS = [  # OpenAI's routes: its 400, `param` naming the field as the request did
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    ("/v1/completions", {"prompt": ["Hi", "x\udfff"]}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "stop": "\ud800"}, "stop"),
]
BAD_INPUTS = [
    ("/value/forward", {"messages": [{"role": "user", "content": "\udc00"}]}, "body.messages.0.content"),
    ("/llm/forward", {"question": "Hi", "context": "\ud800"}, "body.context"),
    ("/llm/direct_forward", {"input_string": "Hi", "max_output_length": "5"}, "body.max_output_length"),
    ("/llm/direct_forward", {"input_string": "Hi", "num_samples": True}, "body.num_samples"),
    ("/llm/direct_forward", {"input_string": "Hi", "temperature": 1e39}, "body.temperature"),
]


def test_bad_inputs_are_422_naming_the_field_and_the_model_keeps_serving(server: str, oai: openai.OpenAI) -> None:
    with httpx.Client(base_url=server, headers=AUTH | {"content-type": "application/json"}, timeout=60) as client:
        for path, body, field in BAD_INPUTS:  # ASCII escapes: the lone surrogates reach the server
            answer = client.post(path, content=json.dumps(body))
            assert answer.status_code == 422, (path, answer.text)
            assert answer.json()["error"]["fields"][0]["field"] == field, answer.text
        for path, body, param in OPENAI_BAD_INPUTS:
            answer = client.post(path, content=json.dumps(body))
            assert answer.status_code == 400 and answer.json()["error"]["param"] == param, (path, answer.text)
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=1e39)
    assert "temperature" in caught.value.message
    chat = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.choices[0].message.role == "assistant"


def test_concurrent_fetches_of_a_queued_task_get_its_result_exactly_once(server: str) -> None:
    """Eight clients poll one queued task as fast as they can: one gets the result, the rest 202
    while it runs and 404 once it is taken, never a second 200 (the task is taken atomically)."""
    import time

    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as client:
        task_id = client.post("/llm/forward", json={"question": "What is 5 + 5?"}).json()["task_id"]

    def poll(_: int) -> list[int]:
        seen: list[int] = []
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=server, headers=AUTH, timeout=60) as client:
            while not seen or seen[-1] == 202:
                assert time.monotonic() < deadline, "the task never finished"
                seen.append(client.get(f"/llm/forward/{task_id}").status_code)
        return seen

    with ThreadPoolExecutor(8) as pool:
        polls = list(pool.map(poll, range(8)))
    finals = sorted(seen[-1] for seen in polls)
    assert finals == [200] + [404] * 7, polls
    assert all(set(seen[:-1]) <= {202} for seen in polls), polls


def test_a_task_whose_replica_was_killed_answers_410_and_new_tasks_complete(server: str) -> None:
    """The one replica holding tasks and sessions dies (SIGKILL to its process): its tasks are gone,
    and fetching one says so (410 task_lost), never a bare 404; Serve replaces the replica."""
    import os
    import signal
    import time

    def tasks_replicas() -> dict[str, int]:
        return live_actors("ServeReplica:it-llm-llm-tasks:llm-tasks")

    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as client:
        task_id = client.post("/llm/forward", json={"question": "What is 6 + 1?"}).json()["task_id"]
        (victim, pid), = tasks_replicas().items()
        os.kill(pid, signal.SIGKILL)
        seen: list[int] = []

        def lost() -> bool:
            answer = client.get(f"/llm/forward/{task_id}")
            seen.append(answer.status_code)
            if answer.status_code == 503:
                assert "Retry-After" in answer.headers
            return answer.status_code == 410 and answer.json()["error"]["code"] == "task_lost"

        wait_until(lost, 120, 0.5, lambda: f"answers {seen[-5:]}")
        assert set(seen) <= {202, 200, 503, 410} and victim not in tasks_replicas()
        new_id = client.post("/llm/forward", json={"question": "What is 2 + 2?"}).json()["task_id"]
        deadline = time.monotonic() + 60
        while (answer := client.get(f"/llm/forward/{new_id}")).status_code == 202:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert answer.status_code == 200, answer.text
