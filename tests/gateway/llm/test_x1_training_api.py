"""x1's /train_from_dataset and /stop_training over HTTP, in-process (trainer in the gateway)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import API_KEY
from fastapi.testclient import TestClient
from support import wait_until

from policy_server.gateway.app import build_app
from policy_server.llm.grpo_step import completion_log_probs
from policy_server.llm.models import load_policy
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}
CHAT = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"}]


@pytest.fixture(params=["transformers"])
def client(request: pytest.FixtureRequest, llm_dirs: dict[str, Path], tmp_path: Path) -> Iterator[TestClient]:
    """A server of the policy and value model with x1 training, on the transformers engine unless
    a test asks for vLLM (``indirect`` parametrisation): a vLLM engine start costs a minute."""
    training = {"data_dir": str(tmp_path / "data"), "samples_dir": str(tmp_path / "samples"),
                "save_dir": str(tmp_path / "trained")}
    schema = {"parameters": {"api_key": API_KEY},
              "llm": {"policy": {"path": str(llm_dirs["policy"]), "engine": request.param, "training": training},
                      "value": {"path": str(llm_dirs["value"]), "training": training}}}
    (tmp_path / "data").mkdir()
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    with TestClient(build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0)), headers=AUTH) as c:
        yield c


def wait_idle(client: TestClient, prefix: str) -> dict[str, Any]:
    def idle() -> dict[str, Any] | None:
        status = client.get(f"{prefix}/").json()
        return None if status["training"]["running"] else status

    return wait_until(idle, 120, message="training still running")


@pytest.mark.parametrize("client", ["transformers", "vllm"], indirect=True)
def test_the_policy_trains_with_ppo_and_serves_the_new_version(client: TestClient, tmp_path: Path) -> None:
    """The trained weights reach the serving engine in place: the answers name version 1 and their
    log-probs are the saved trained model's, teacher-forced (on vLLM too, tied output layer included)."""
    assert client.get("/llm/").json()["allow_training"] is True
    dataset = [{"messages": CHAT, "GAE": 1.0}, {"question": "What is 1 + 1?", "context": "", "current_node": "2", "value": 0.5}]
    started = client.post("/llm/train_from_dataset", json={"dataset": dataset, "num_epochs": 3, "lr": 1e-3,
                                                           "save_samples": True})
    assert started.status_code == 201, started.text
    assert started.json()["message"].startswith("Training started with ") and "GPUs" in started.json()["message"]
    status = wait_idle(client, "/llm")
    assert status["model_version"] == 1 and status["training"]["last_run"]["error"] is None
    assert status["training"]["last_run"]["step"] == 3
    answer = client.post("/llm/direct_forward", json={"input_string": "Hi", "return_tokens": True,
                                                       "temperature": 1.0, "seed": 3, "num_samples": 2})
    assert answer.json()["model_version"] == 1  # the trained weights serve now
    assert list((tmp_path / "samples" / "policy").glob("*.jsonl")) and (tmp_path / "trained" / "policy").is_dir()
    trained = load_policy(tmp_path / "trained" / "policy", None, "float32", "cpu").model
    for record in answer.json()["records"]:
        n = record["prompt_length"]
        with torch.no_grad():
            forced, _ = completion_log_probs(trained, record["tokens"][:n], [record["tokens"][n:]], torch.device("cpu"))
        assert record["logprobs"][n:] == pytest.approx(forced[0].tolist(), abs=1e-4)


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
    for body, field in [({}, "body"), ({"dataset": [], "dataset_path": "d.jsonl"}, "body"), ({"dataset": []}, "body.dataset")]:
        refused = client.post("/llm/train_from_dataset", json=body)
        assert field_of(refused) == field and refused.json()["error"]["message"].startswith(f"{field}: "), body
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


def post_raw(client: TestClient, path: str, body: Any) -> Any:
    """POST with ASCII escapes, so that a lone surrogate (``\\ud800``) and NaN reach the server."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def field_of(answer: Any) -> str:
    assert answer.status_code == 422, answer.text
    return answer.json()["error"]["fields"][0]["field"]


DOC = {"question": "What is 1 + 1?", "context": "", "current_node": "2", "value": 0.5}
BAD_REQUESTS = [
    # a number that overflows the float32 loss, or is no number, in a sample
    ("/value", {"dataset": [{"messages": CHAT, "value_target": 1e39}]}, "body.dataset.0.value_target"),
    ("/value", {"dataset": [{"messages": CHAT, "value_target": 0.5}, {"messages": CHAT, "value_target": float("nan")}]},
     "body.dataset.1.value_target"),
    ("/value", {"dataset": [DOC | {"value": True}]}, "body.dataset.0.value"),
    ("/llm", {"dataset": [{"messages": CHAT, "GAE": 1e39}]}, "body.dataset.0.GAE"),
    ("/llm", {"dataset": [{"messages": CHAT, "GAE": False}]}, "body.dataset.0.GAE"),
    ("/llm", {"dataset": [{"messages": CHAT, "advantage": "1.0"}]}, "body.dataset.0.advantage"),
    ("/llm", {"dataset": [{"messages": CHAT, "GAE": 1.0, "logprobs": [-1e39]}]}, "body.dataset.0.logprobs.0"),
    ("/llm", {"dataset": [DOC | {"value": float("-inf")}]}, "body.dataset.0.value"),
    # a text no tokenizer can encode, in a sample
    ("/llm", {"dataset": [{"messages": [{"role": "user", "content": "\ud800"}, CHAT[1]], "GAE": 1.0}]},
     "body.dataset.0.messages.0.content"),
    ("/value", {"dataset": [DOC | {"current_node": "x\udfff"}]}, "body.dataset.0.current_node"),
    # the request's own fields, taken strictly
    ("/llm", {"dataset": [DOC], "num_epochs": "2"}, "body.num_epochs"),
    ("/llm", {"dataset": [DOC], "num_epochs": True}, "body.num_epochs"),
    ("/llm", {"dataset": [DOC], "save_samples": 1}, "body.save_samples"),
    ("/llm", {"dataset": [DOC], "kl_coef": 1e39}, "body.kl_coef"),
    ("/llm", {"dataset": [DOC], "clip": float("nan")}, "body.clip"),
    ("/llm", {"dataset": [DOC], "lr": "1e-3"}, "body.lr"),
    ("/llm", {"dataset": [DOC], "lora": {"r": "4"}}, "body.lora.r"),
    ("/llm", {"dataset": [DOC], "lora": {"dropout": True}}, "body.lora.dropout"),
    ("/llm", {"dataset": [DOC], "lora": {"dropout": False}}, "body.lora.dropout"),
    ("/llm", {"dataset": [DOC], "lora": {"alpha": 10**400}}, "body.lora.alpha"),
    ("/llm", {"dataset_path": "\ud800.jsonl"}, "body.dataset_path"),
]


def test_bad_samples_and_settings_are_422_naming_the_sample_and_field(client: TestClient) -> None:
    for prefix, body, field in BAD_REQUESTS:
        assert field_of(post_raw(client, f"{prefix}/train_from_dataset", body)) == field, body
    assert client.get("/llm/").json()["training"]["running"] is False
    assert client.get("/value/").json()["training"]["running"] is False


def test_bad_samples_in_a_dataset_file_are_422_naming_the_sample_and_field(client: TestClient, tmp_path: Path) -> None:
    data = tmp_path / "data"
    files = {
        "huge.jsonl": [{"messages": CHAT, "value_target": 0.5}, {"messages": CHAT, "value_target": 1e39}],
        "nan.json": [{"messages": CHAT, "value_target": float("nan")}],  # Python's JSON reads NaN
        "surrogate.jsonl": [DOC, DOC | {"question": "\ud800"}],  # written as the escape \ud800
    }
    for name, samples in files.items():
        text = json.dumps(samples) if name.endswith(".json") else "".join(json.dumps(x) + "\n" for x in samples)
        (data / name).write_text(text)
    (data / "latin1.jsonl").write_bytes(json.dumps(DOC).replace("What", "W\xe4t").encode("latin-1"))
    expected = {"huge.jsonl": "body.dataset_path.1.value_target", "nan.json": "body.dataset_path.0.value_target",
                "surrogate.jsonl": "body.dataset_path.1.question", "latin1.jsonl": "body.dataset_path"}
    for name, field in expected.items():
        assert field_of(client.post("/value/train_from_dataset", json={"dataset_path": name})) == field, name
    assert client.get("/value/").json()["training"]["running"] is False
