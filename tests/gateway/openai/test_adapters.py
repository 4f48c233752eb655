"""Several LoRA adapters on one policy (vLLM multi-LoRA, `llm.policy.adapters`): each is a model id on
OpenAI's routes, through the real `openai` client against the session's vLLM server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from conftest import API_KEY, vllm_adapters

from policy_server.llm.generation import Generator
from policy_server.llm.models import load_policy

TOLERANCE = 1e-4
PROMPT = "Once upon a time"


@pytest.fixture()
def oai(vllm_server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{vllm_server}/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


def teacher(llm_dirs: dict[str, Path], adapter: Path | None) -> Generator:
    """The float32 peft model of the tiny policy with ``adapter`` (None: the policy alone), on transformers."""
    return Generator(load_policy(llm_dirs["policy"], adapter, dtype="float32", device="cpu"))


def test_models_lists_the_policy_and_each_adapter_with_its_parent(oai: openai.OpenAI, llm_dirs: dict[str, Path]) -> None:
    models = oai.models.list().data
    assert [(m.id, m.model_extra.get("parent")) for m in models] == [
        ("tiny", None), *((name, "tiny") for name in vllm_adapters(llm_dirs))]
    one = oai.models.retrieve("tiny-lora-b")
    assert (one.id, one.object, one.owned_by, one.model_extra["parent"]) == ("tiny-lora-b", "model", "policy-server", "tiny")
    with pytest.raises(openai.NotFoundError) as caught:
        oai.models.retrieve("tiny-lora-c")
    assert "'tiny', 'tiny-lora-a', 'tiny-lora-b'" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="tiny-lora-c", prompt=PROMPT, max_tokens=2)


def test_each_adapter_generates_with_its_own_weights(oai: openai.OpenAI, llm_dirs: dict[str, Path]) -> None:
    """Greedy completions with logprobs under each model id are the teacher-forced log-probs of the
    peft model with that adapter (float32), and no other of the three models gives them."""
    folders: dict[str, Path | None] = {"tiny": None, **{n: Path(f) for n, f in vllm_adapters(llm_dirs).items()}}
    teachers = {model: teacher(llm_dirs, adapter) for model, adapter in folders.items()}
    for model in folders:
        answer = oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1)
        choice = answer.choices[0]
        assert answer.model == model and choice.logprobs is not None
        prompt, ids = choice.model_extra["prompt_token_ids"], choice.model_extra["token_ids"]
        logprobs = choice.logprobs.token_logprobs
        assert len(ids) == len(logprobs) > 0
        with torch.inference_mode():
            forced = {other: t.log_probs(prompt, ids) for other, t in teachers.items()}
        np.testing.assert_allclose(logprobs, forced[model], atol=TOLERANCE)
        for other in folders.keys() - {model}:
            assert not np.allclose(logprobs, forced[other], atol=1e-3), (model, other)


def test_chat_and_streams_name_the_adapter_they_ran(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    whole = oai.chat.completions.create(model="tiny-lora-a", messages=messages, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert whole.model == "tiny-lora-a"
    chunks = list(oai.chat.completions.create(model="tiny-lora-a", messages=messages, max_tokens=6,  # type: ignore[arg-type]
                                              temperature=0, stream=True))
    assert {c.model for c in chunks} == {"tiny-lora-a"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    base = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert base.model == "tiny"
