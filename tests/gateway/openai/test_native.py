"""vLLM's native ``POST /generate`` against a real server: the exact payload Atropos's ``VLLMServer``
sends, and atroposlib's own ``ManagedServer`` over two chat turns."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from conftest import API_KEY, llm_schema, running_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from policy_server.settings import Settings

ENGINES = ["transformers", "vllm"]


@pytest.fixture(scope="module", params=ENGINES)
def server(request: pytest.FixtureRequest, llm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server of the tiny policy on each engine (the vLLM one is the session's)."""
    from policy_server.gateway.app import build_app

    if request.param == "vllm":
        yield request.getfixturevalue("vllm_server")
        return
    schema = llm_schema(llm_dirs)
    schema["llm"]["policy"]["engine"] = request.param
    path = tmp_path_factory.mktemp(f"native-{request.param}") / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    with running_server(build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0))) as url:
        yield url


def _post(server: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server}/generate", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)


def _teacher_forced(policy: Path, tokens: list[int]) -> list[float]:
    """log p(token i | tokens before it) for i >= 1, from one forward of the tiny model."""
    model = AutoModelForCausalLM.from_pretrained(str(policy), dtype=torch.float32)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None]).squeeze(-1).tolist()


def test_atropos_payload_gets_per_token_id_logprobs_and_finish_reasons(server: str, llm_dirs: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dirs["policy"]))
    prompt = tokenizer.encode("Once upon a time")
    answer = _post(server, {"prompt": {"prompt_token_ids": prompt}, "logprobs": 0, "n": 2, "max_tokens": 6,
                            "temperature": 1.0})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["logprobs"]) == len(body["finish_reasons"]) == len(body["token_ids"]) == 2
    assert body["prompt_token_ids"] == prompt
    for per_token, ids, reason in zip(body["logprobs"], body["token_ids"], body["finish_reasons"]):
        assert [int(next(iter(item[0]))) for item in per_token] == ids and reason in ("stop", "length")
        forced = _teacher_forced(llm_dirs["policy"], prompt + ids)[len(prompt) - 1:]
        assert [next(iter(item[0].values())) for item in per_token] == pytest.approx(forced, abs=1e-4)

    plain = _post(server, {"prompt": {"prompt_token_ids": prompt}, "max_tokens": 4, "temperature": 0.0}).json()
    assert plain["prompt_token_ids"] == prompt and len(plain["token_ids"]) == 1 and "logprobs" not in plain
    text = _post(server, {"prompt": "Once upon a time", "max_tokens": 4}).json()
    assert set(text) == {"text", "prompt", "finish_reasons"}  # vLLM's answer to a text prompt


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": {"prompt_token_ids": [10**9]}}, "body.prompt.prompt_token_ids.0"),
        ({"prompt": {"prompt_token_ids": []}}, "body.prompt"),
        ({"prompt": "Hi", "best_of": 2}, "body.best_of"),
        ({"prompt": "Hi", "stream": True}, "body.stream"),
        ({"prompt": "Hi", "stream": 0}, "body.stream"),  # JSON types are strict, as on our own routes
        ({"prompt": "Hi", "n": "2"}, "body.n"),
        ({"prompt": "Hi", "temperature": 3.4028235e38}, "body.temperature"),  # vLLM's bound, on both engines
        ({"prompt": "Hi", "max_tokens": 10**6}, "body.max_tokens"),
    ],
)
def test_bad_generate_requests_get_our_422_naming_the_field(server: str, body: dict[str, Any], field: str) -> None:
    answer = _post(server, body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["fields"][0]["field"].startswith(field)


def test_atroposlib_managed_server_runs_two_chat_turns_with_aligned_tokens_and_logprobs(
    server: str, llm_dirs: dict[str, Path]
) -> None:
    from atroposlib.envs.server_handling.managed_server import ManagedServer
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    config = APIServerConfig(model_name="tiny", base_url=f"{server}/v1", api_key=API_KEY,
                             tokenizer_name=str(llm_dirs["policy"]), server_type="vllm", health_check=False)
    backend = VLLMServer(config)
    managed = ManagedServer(backend, tokenizer=backend.tokenizer)

    async def two_turns() -> dict[str, Any]:
        messages = [{"role": "user", "content": "Hi"}]
        first = await managed.chat_completion(messages=messages, n=1, max_tokens=6, temperature=1.0)
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
        await managed.chat_completion(messages=messages, n=1, max_tokens=6, temperature=1.0)
        return managed.get_state()

    nodes = asyncio.run(two_turns())["nodes"]
    assert nodes
    for node in nodes:
        assert len(node.tokens) == len(node.masked_tokens) == len(node.logprobs)
        sampled = [i for i, t in enumerate(node.masked_tokens) if t != -100]
        assert sampled and all(node.tokens[i] == node.masked_tokens[i] for i in sampled)
        forced = _teacher_forced(llm_dirs["policy"], node.tokens)
        assert [node.logprobs[i] for i in sampled] == pytest.approx([forced[i - 1] for i in sampled], abs=1e-4)
