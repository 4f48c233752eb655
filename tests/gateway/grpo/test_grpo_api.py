"""GRPO over HTTP, in-process: the client asks for completions, scores them here, sends rewards."""

from __future__ import annotations

import io
import json
import tarfile
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
PROMPT = "What is 3 + 4?"
SETTINGS = {"group_size": 8, "lr": 1e-3, "lora": False, "chat": True, "max_completion_length": 16,
            "checkpoint_every": 10, "seed": 0}


def grpo_schema(llm_dirs: dict[str, Path], save_dir: Path) -> dict[str, Any]:
    return {"parameters": {"api_key": API_KEY},
            "llm": {"policy": {"path": str(llm_dirs["policy"]), "engine": "transformers",
                               "training": {"save_dir": str(save_dir)}}}}


def make_client(llm_dirs: dict[str, Path], folder: Path) -> TestClient:
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(grpo_schema(llm_dirs, folder / "trained"), sort_keys=False))
    return TestClient(build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0)), headers=AUTH)


@pytest.fixture()
def client(llm_dirs: dict[str, Path], tmp_path: Path) -> Iterator[TestClient]:
    with make_client(llm_dirs, tmp_path) as c:
        yield c


def sevens(completion: dict[str, Any]) -> float:
    """The client's own reward: how often the completion says " 7", per token."""
    return completion["text"].count(" 7") / max(1, len(completion["token_ids"]))


def cycle(client: TestClient, run_id: str) -> dict[str, Any]:
    group = client.post(f"/llm/grpo/runs/{run_id}/completions", json={"prompt": PROMPT}).json()
    rewards = [sevens(c) for c in group["completions"]]
    answer = client.post(f"/llm/grpo/runs/{run_id}/rewards", json={"group_id": group["group_id"], "rewards": rewards})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_rewards_sent_by_the_client_raise_the_mean_reward(client: TestClient) -> None:
    started = client.post("/llm/grpo/runs", json=SETTINGS)
    assert started.status_code == 201, started.text
    run_id = started.json()["run_id"]
    curve = [cycle(client, run_id)["mean_reward"] for _ in range(50)]
    first, last = sum(curve[:10]) / 10, sum(curve[-10:]) / 10
    assert last > first + 0.2, curve
    status = client.get(f"/llm/grpo/runs/{run_id}").json()
    assert status["cycle"] == 50 and status["model_version"] == [run_id, 50]
    archive = client.get(f"/llm/grpo/runs/{run_id}/model")
    assert archive.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        names = tar.getnames()
    assert any(n.endswith("config.json") for n in names)


def test_versions_stale_groups_finished_and_unknown_runs(client: TestClient) -> None:
    run_id = client.post("/llm/grpo/runs", json=SETTINGS | {"group_size": 2}).json()["run_id"]
    old = client.post(f"/llm/grpo/runs/{run_id}/completions", json={"prompt": PROMPT}).json()
    assert old["model_version"] == [run_id, 0] and len(old["completions"]) == 2
    assert cycle(client, run_id)["model_version"] == [run_id, 1]
    stale = client.post(f"/llm/grpo/runs/{run_id}/rewards", json={"group_id": old["group_id"], "rewards": [1, 0]})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "stale_group"
    assert client.get(f"/llm/grpo/runs/{run_id}").json()["rejected_stale"] == 1
    assert client.post(f"/llm/grpo/runs/{run_id}/stop").json()["state"] == "finished"
    finished = client.post(f"/llm/grpo/runs/{run_id}/completions", json={"prompt": PROMPT})
    assert finished.status_code == 409 and finished.json()["error"]["code"] == "run_finished"
    assert client.get("/llm/grpo/runs/nope").status_code == 404
    assert client.post("/llm/grpo/runs", json={"group_size": 1}).status_code == 422


def test_a_restarted_server_resumes_the_run_and_its_cycle_count(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    with make_client(llm_dirs, tmp_path) as first:
        run_id = first.post("/llm/grpo/runs", json=SETTINGS | {"checkpoint_every": 2}).json()["run_id"]
        for _ in range(4):
            cycle(first, run_id)
    with make_client(llm_dirs, tmp_path) as second:  # a new process would see the same folder
        assert second.get(f"/llm/grpo/runs/{run_id}").json()["cycle"] == 4
        assert cycle(second, run_id)["model_version"] == [run_id, 5]


def post_raw(client: TestClient, path: str, body: Any) -> Any:
    """POST with ASCII escapes, so that a lone surrogate (``\\ud800``) and NaN reach the server."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def field_of(answer: Any) -> str:
    assert answer.status_code == 422, answer.text
    return answer.json()["error"]["fields"][0]["field"]


BAD_REWARDS = [
    ([True, False], "body.rewards.0"),  # JSON booleans are no rewards (pydantic made them 1.0 and 0.0)
    ([1.0, False], "body.rewards.1"),
    ([1e39, 0.0], "body.rewards.0"),  # finite as float64, inf as the float32 the advantages are
    ([0.0, -3.5e38], "body.rewards.1"),
    ([float("nan"), 0.0], "body.rewards.0"),
    ([0.0, float("-inf")], "body.rewards.1"),
    (["1", 0.0], "body.rewards.0"),
    ([None, 0.0], "body.rewards.0"),
    ([1.0], "body.rewards"),  # one reward per completion
    ([], "body.rewards"),
]


def test_bad_rewards_are_422_naming_the_reward_and_the_group_still_trains(client: TestClient) -> None:
    run_id = client.post("/llm/grpo/runs", json=SETTINGS | {"group_size": 2}).json()["run_id"]
    group = client.post(f"/llm/grpo/runs/{run_id}/completions", json={"prompt": PROMPT}).json()
    path = f"/llm/grpo/runs/{run_id}/rewards"
    for rewards, field in BAD_REWARDS:
        answer = post_raw(client, path, {"group_id": group["group_id"], "rewards": rewards})
        assert field_of(answer) == field, rewards
    status = client.get(f"/llm/grpo/runs/{run_id}").json()
    assert status["cycle"] == 0 and status["rewards_received"] == 0
    good = client.post(path, json={"group_id": group["group_id"], "rewards": [1, 0.0]})  # an integer is a number
    assert good.status_code == 200, good.text
    assert good.json()["model_version"] == [run_id, 1]


BAD_SETTINGS = [
    ({"group_size": "4"}, "body.group_size"),
    ({"group_size": 4.0}, "body.group_size"),
    ({"chat": 1}, "body.chat"),
    ({"lora": "false"}, "body.lora"),
    ({"lr": True}, "body.lr"),
    ({"beta": 1e39}, "body.beta"),
    ({"beta": float("nan")}, "body.beta"),
    ({"temperature": float("inf")}, "body.temperature"),
    ({"stop_strings": ["\n", "\ud800"]}, "body.stop_strings.1"),
    ({"stop_strings": "\n"}, "body.stop_strings"),
    ({"stop_strings": ["\n", ""]}, "body.stop_strings.1"),  # a run that ends every completion at once
    ({"seed": "0"}, "body.seed"),
    ({"seed": False}, "body.seed"),
    ({"lora": True, "lora_alpha": 10**400}, "body.lora_alpha"),
    ({"lora": True, "lora_r": 10**9}, "body.lora_r"),
]


def test_bad_run_settings_are_422_naming_the_field(client: TestClient) -> None:
    for settings, field in BAD_SETTINGS:
        assert field_of(post_raw(client, "/llm/grpo/runs", SETTINGS | settings)) == field, settings
    assert client.get("/llm/grpo/runs").json()["runs"] == []


def test_a_prompt_the_tokenizer_cannot_encode_is_422(client: TestClient) -> None:
    run_id = client.post("/llm/grpo/runs", json=SETTINGS | {"group_size": 2}).json()["run_id"]
    for prompt in ("\ud800", "What is 3 + 4?\udfff"):
        answer = post_raw(client, f"/llm/grpo/runs/{run_id}/completions", {"prompt": prompt})
        assert field_of(answer) == "body.prompt"
    assert field_of(post_raw(client, f"/llm/grpo/runs/{run_id}/completions", {"prompt": 7})) == "body.prompt"
    assert client.get(f"/llm/grpo/runs/{run_id}").json()["groups_handed_out"] == 0
