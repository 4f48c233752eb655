"""A GRPO run that trains the served model (``serve: true``) on the session's vLLM server: its groups
come from vLLM, its weights go back into vLLM after every cycle, and the served answers name them."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import API_KEY

from policy_server.llm.grpo_step import completion_log_probs
from policy_server.llm.models import load_policy

AUTH = {"access-token": API_KEY}
PROMPT = "What is 3 + 4?"
SETTINGS = {"group_size": 8, "lr": 1e-3, "lora": False, "chat": True, "max_completion_length": 16,
            "checkpoint_every": 100, "seed": 0, "serve": True}
PROBE = {"input_string": "The answer is", "temperature": 1.0, "seed": 5, "num_samples": 2,
         "max_output_length": 20, "return_tokens": True}


def post(client: httpx.Client, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    answer = client.post(path, json=body)
    assert answer.status_code == status, answer.text
    return answer.json()


def sevens(completion: dict[str, Any]) -> float:
    return completion["text"].count(" 7") / max(1, len(completion["token_ids"]))


def cycle(client: httpx.Client, run_id: str) -> dict[str, Any]:
    group = post(client, f"/llm/grpo/runs/{run_id}/completions", {"prompt": PROMPT})
    rewards = [sevens(c) for c in group["completions"]]
    answer = post(client, f"/llm/grpo/runs/{run_id}/rewards", {"group_id": group["group_id"], "rewards": rewards})
    assert answer["served_version"] == group["served_version"] + 1  # published before answering
    return answer


def served_records(client: httpx.Client) -> tuple[list[dict[str, Any]], int]:
    answer = post(client, "/llm/direct_forward", PROBE)
    return answer["records"], answer["model_version"]


def teacher_forced(model: Any, record: dict[str, Any]) -> list[float]:
    n = record["prompt_length"]
    with torch.no_grad():
        log_probs, _ = completion_log_probs(model, record["tokens"][:n], [record["tokens"][n:]], torch.device("cpu"))
    return log_probs[0].tolist()


def test_a_serving_run_raises_the_reward_with_its_weights_in_the_vllm_replica(vllm_server: str, tmp_path: Path) -> None:
    with httpx.Client(base_url=vllm_server, headers=AUTH, timeout=300) as client:
        before, base_version = served_records(client)
        started = post(client, "/llm/grpo/runs", SETTINGS, status=201)
        run_id, version = started["run_id"], started["served_version"]
        assert version == base_version + 1  # the run's starting weights, published

        second = client.post("/llm/grpo/runs", json=SETTINGS)
        assert second.status_code == 409 and run_id in second.json()["error"]["message"]

        curve = [cycle(client, run_id)["mean_reward"] for _ in range(40)]
        first, last = sum(curve[:10]) / 10, sum(curve[-10:]) / 10
        assert last > first + 0.2, curve
        status = client.get(f"/llm/grpo/runs/{run_id}").json()
        assert status["served_version"] == version + 40 and status["cycle"] == 40

        # the served answers now come from the run's weights and name their version
        after, served_version = served_records(client)
        assert served_version == version + 40 and all(r["model_version"] == served_version for r in after)
        archive = client.get(f"/llm/grpo/runs/{run_id}/model")
        with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
            tar.extractall(tmp_path, filter="data")
        trained = load_policy(next(tmp_path.iterdir()))
        for record in after:
            logprobs = record["logprobs"][record["prompt_length"]:]
            assert teacher_forced(trained.model, record) == pytest.approx(logprobs, abs=1e-4)

        post(client, f"/llm/grpo/runs/{run_id}/stop", {})
        # put the policy's own weights back for the session's other tests: a serving run publishes
        # its starting weights (the policy's files) when it starts
        restorer = post(client, "/llm/grpo/runs", SETTINGS, status=201)
        post(client, f"/llm/grpo/runs/{restorer['run_id']}/stop", {})
        restored, restored_version = served_records(client)
        assert restored_version == served_version + 1
        for old, new in zip(before, restored):
            assert new["tokens"] == old["tokens"]
            assert new["logprobs"] == pytest.approx(old["logprobs"], abs=1e-5)
