"""x1's /train_from_dataset and /stop_training over HTTP, in-process (trainer in the gateway)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import API_KEY
from fastapi.testclient import TestClient

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}
CHAT = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"}]


@pytest.fixture()
def client(llm_dirs: dict[str, Path], tmp_path: Path) -> Iterator[TestClient]:
    training = {"data_dir": str(tmp_path / "data"), "samples_dir": str(tmp_path / "samples"),
                "save_dir": str(tmp_path / "trained")}
    schema = {"parameters": {"api_key": API_KEY},
              "llm": {"policy": {"path": str(llm_dirs["policy"]), "training": training},
                      "value": {"path": str(llm_dirs["value"]), "training": training}}}
    (tmp_path / "data").mkdir()
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    with TestClient(build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0)), headers=AUTH) as c:
        yield c


def wait_idle(client: TestClient, prefix: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while (status := client.get(f"{prefix}/").json())["training"]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return status


def test_the_policy_trains_with_ppo_and_serves_the_new_version(client: TestClient, tmp_path: Path) -> None:
    assert client.get("/llm/").json()["allow_training"] is True
    dataset = [{"messages": CHAT, "GAE": 1.0}, {"question": "What is 1 + 1?", "context": "", "current_node": "2", "value": 0.5}]
    started = client.post("/llm/train_from_dataset", json={"dataset": dataset, "num_epochs": 3, "lr": 1e-3,
                                                           "save_samples": True})
    assert started.status_code == 201, started.text
    assert started.json()["message"].startswith("Training started with ") and "GPUs" in started.json()["message"]
    status = wait_idle(client, "/llm")
    assert status["model_version"] == 1 and status["training"]["last_run"]["error"] is None
    assert status["training"]["last_run"]["step"] == 3
    answer = client.post("/llm/direct_forward", json={"input_string": "Hi", "return_tokens": True})
    assert answer.json()["model_version"] == 1  # the trained weights serve now
    assert list((tmp_path / "samples" / "policy").glob("*.jsonl")) and (tmp_path / "trained" / "policy").is_dir()


def test_stop_interrupts_saves_and_a_second_run_is_refused_meanwhile(client: TestClient) -> None:
    assert client.post("/value/stop_training").json() == {"message": "No training run is going"}
    dataset = [{"messages": CHAT, "value_target": 0.9}] * 8
    assert client.post("/value/train_from_dataset", json={"dataset": dataset, "num_epochs": 500}).status_code == 201
    busy = client.post("/value/train_from_dataset", json={"dataset": dataset})
    assert busy.status_code == 403
    during = client.post("/value/forward", json={"messages": CHAT})  # serving goes on, on version 0
    assert during.status_code == 200 and during.json()["model_version"] == 0
    assert client.get("/value/").json()["training"]["running"] is True
    stopped = client.post("/value/stop_training")
    assert stopped.json() == {"message": "Training stopped and model saved"}
    status = wait_idle(client, "/value")
    run = status["training"]["last_run"]
    assert run["stopped"] is True and run["step"] < run["total_steps"] and status["model_version"] == 1
    assert client.post("/value/forward", json={"messages": CHAT}).json()["model_version"] == 1


def test_bad_datasets_are_refused_before_anything_starts(client: TestClient, tmp_path: Path) -> None:
    outside = client.post("/llm/train_from_dataset", json={"dataset_path": "../schema.yaml"})
    assert outside.status_code == 403
    missing = client.post("/llm/train_from_dataset", json={"dataset_path": "nope.jsonl"})
    assert missing.status_code == 404
    bad = client.post("/llm/train_from_dataset", json={"dataset": [{"messages": CHAT}]})
    assert bad.status_code == 422 and "body.dataset.0" in bad.text
    both = client.post("/llm/train_from_dataset", json={})
    assert both.status_code == 422
    (tmp_path / "data" / "d.jsonl").write_text(json.dumps({"messages": CHAT, "value_target": 0.5}) + "\n")
    assert client.post("/value/train_from_dataset", json={"dataset_path": "d.jsonl"}).status_code == 201
    assert client.get("/llm/").json()["training"]["running"] is False


def test_a_new_lora_adapter_is_trained_and_merged_into_the_served_weights(client: TestClient, tmp_path: Path) -> None:
    before = client.post("/llm/direct_forward", json={"input_string": "What is 2 + 3?", "return_tokens": True,
                                                      "temperature": 0, "max_output_length": 20}).json()
    dataset = [{"messages": CHAT, "GAE": 1.0}] * 4
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    assert client.post("/llm/train_from_dataset", json={"dataset": dataset, "lr": 1e-2, "lora": lora}).status_code == 201
    status = wait_idle(client, "/llm")
    assert status["training"]["last_run"]["error"] is None and status["model_version"] == 1
    assert (tmp_path / "trained" / "policy" / "adapter_config.json").is_file()
    after = client.post("/llm/direct_forward", json={"input_string": "What is 2 + 3?", "return_tokens": True,
                                                     "temperature": 0, "max_output_length": 20}).json()
    n = before["records"][0]["prompt_length"]
    assert after["model_version"] == 1
    assert after["records"][0]["logprobs"][n:] != before["records"][0]["logprobs"][n:]  # the merged update serves
