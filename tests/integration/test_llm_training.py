"""GRPO runs on their own Ray Serve deployment, beside the serving one, behind a real uvicorn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import API_KEY, running_server
from support import wait_until

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}


@pytest.fixture(scope="module")
def client(ray_session: int, llm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    folder = tmp_path_factory.mktemp("llm-train")
    schema = {"parameters": {"api_key": API_KEY},
              "llm": {"policy": {"path": str(llm_dirs["policy"]), "engine": "transformers", "resources": {"num_cpus": 0.5},
                                 "training": {"save_dir": str(folder / "trained"), "num_cpus": 0.5}}}}
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    settings = Settings(schema_path=path, gateway_metrics_port=0, serve_app_prefix="it-llm-train")
    with running_server(build_app(settings)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
        yield c


def test_a_grpo_run_over_serve_trains_while_the_policy_keeps_serving(client: httpx.Client) -> None:
    settings = {"group_size": 4, "lr": 1e-3, "lora": True, "chat": True, "max_completion_length": 8}
    run_id = client.post("/llm/grpo/runs", json=settings).json()["run_id"]
    for cycle in range(1, 4):
        group = client.post(f"/llm/grpo/runs/{run_id}/completions", json={"prompt": "Sort: b a"}).json()
        assert [len(c["token_ids"]) == len(c["logprobs"]) for c in group["completions"]] == [True] * 4
        rewards = [float(i) for i in range(4)]
        answer = client.post(f"/llm/grpo/runs/{run_id}/rewards", json={"group_id": group["group_id"], "rewards": rewards})
        assert answer.json()["model_version"] == [run_id, cycle]
        served = client.post("/llm/direct_forward", json={"input_string": "Hi", "max_output_length": 8})
        assert served.status_code == 200  # serving answers while the run trains
    assert client.post(f"/llm/grpo/runs/{run_id}/stop").json()["state"] == "finished"
    assert client.get(f"/llm/grpo/runs/{run_id}/model").content[:2] == b"\x1f\x8b"  # gzip


def test_a_serving_grpo_run_over_serve_publishes_into_the_policy_replica(client: httpx.Client) -> None:
    """``serve: true`` on Ray Serve: the GRPO deployment samples through the policy deployment's
    handle and broadcasts its weights into it after each cycle, before the rewards answer; only one
    serving run at a time. (x1 training, the next test, then publishes above these versions.)"""
    settings = {"group_size": 4, "lr": 1e-3, "lora": True, "chat": True, "max_completion_length": 8, "serve": True}
    started = client.post("/llm/grpo/runs", json=settings)
    assert started.status_code == 201, started.text
    run_id, version = started.json()["run_id"], started.json()["served_version"]
    assert client.get("/llm/").json()["model_version"] == version  # published at the start
    second = client.post("/llm/grpo/runs", json=settings)
    assert second.status_code == 409 and run_id in second.text
    for cycle in range(1, 4):
        group = client.post(f"/llm/grpo/runs/{run_id}/completions", json={"prompt": "Sort: b a"}).json()
        assert group["served_version"] == version + cycle - 1
        rewards = {"group_id": group["group_id"], "rewards": [float(i) for i in range(4)]}
        answer = client.post(f"/llm/grpo/runs/{run_id}/rewards", json=rewards).json()
        assert answer["served_version"] == version + cycle
        served = client.post("/llm/direct_forward", json={"input_string": "Hi", "max_output_length": 8})
        assert served.json()["model_version"] == version + cycle
    assert client.post(f"/llm/grpo/runs/{run_id}/stop").json()["state"] == "finished"


def test_train_from_dataset_over_serve_publishes_the_trained_weights(client: httpx.Client) -> None:
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    before = client.get("/llm/").json()["model_version"]
    started = client.post("/llm/train_from_dataset", json={"dataset": [{"messages": chat, "GAE": 1.0}] * 4, "lr": 1e-3})
    assert started.status_code == 201, started.text

    def trained() -> dict[str, Any] | None:
        status = client.get("/llm/").json()
        return None if status["training"]["running"] or status["model_version"] == before else status

    status = wait_until(trained, 120, 0.1, lambda: str(client.get("/llm/").json()))
    assert status["model_version"] == before + 1 and status["training"]["last_run"]["error"] is None
    answer = client.post("/llm/direct_forward", json={"input_string": "Hi", "max_output_length": 8})
    assert answer.json()["model_version"] == before + 1
