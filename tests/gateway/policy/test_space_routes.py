"""Policies with a Gymnasium observation space, in-process (TestClient, local backend): JSON
requests of the space, exact answers against the model run directly, 422s naming the first bad
value, the OpenAPI document of the nested arrays, and PPO on uint8 images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium.spaces as gs
import numpy as np
import pytest
import torch
import yaml
from conftest import API_KEY, assert_422_naming
from fastapi.testclient import TestClient
from support import wait_until

from policy_server.export import CNNPolicy, MLPPolicy, export_module
from policy_server.gateway.app import build_app
from policy_server.policies.torch_policy import TorchPolicy
from policy_server.settings import Settings

IMAGE = {"type": "box", "shape": [8, 8, 1], "dtype": "uint8", "low": 0, "high": 255}
ROBOT = {"type": "dict", "spaces": {"pos": {"type": "box", "shape": [2], "low": -1, "high": 1},
                                    "gear": {"type": "discrete", "n": 3}}}
ROBOT_SPACE = gs.Dict({"pos": gs.Box(-1.0, 1.0, (2,), np.float32), "gear": gs.Discrete(3)})


def schema(models: Path, checkpoint_dir: Path) -> dict[str, Any]:
    return {
        "parameters": {"api_key": API_KEY, "default_policy": "atari"},
        "policies": {
            "atari": {"model": str(models / "cnn.pt2"), "observation_space": IMAGE,
                      "training": {"checkpoint_dir": str(checkpoint_dir), "seed": 0,
                                   "ppo": {"rollout_samples": 8, "num_minibatches": 2, "update_epochs": 1}}},
            "robot": {"model": str(models / "robot.pt2"), "observation_space": ROBOT},
        },
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("space-models")
    torch.manual_seed(0)
    export_module(CNNPolicy((8, 8, 1), 4, channels=4, hidden=16), (8, 8, 1), root / "cnn", dtype=torch.uint8)
    export_module(MLPPolicy(3 + 2, [8], nvec=[3]), 5, root / "robot")
    return root


@pytest.fixture(scope="module")
def client(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    path = tmp_path_factory.mktemp("space-schema") / "schema.yaml"
    path.write_text(yaml.safe_dump(schema(models, path.parent / "ckpt"), sort_keys=False))
    settings = Settings(schema_path=path, backend="local", gateway_metrics_port=0, seed=0)
    with TestClient(build_app(settings), headers={"access-token": API_KEY}) as c:
        yield c


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), -1).numpy()


def test_images_reach_the_model_as_uint8_and_the_answers_are_exact(client: TestClient, models: Path) -> None:
    batch = images(3)
    expected = softmax(TorchPolicy.from_file(models / "cnn.pt2").forward(batch).heads[0])
    one = client.post("/distribution", json={"obs": batch[0].tolist()})
    assert one.status_code == 200, one.text
    assert list(one.json()["probabilities"].values()) == pytest.approx(expected[0].tolist(), abs=1e-6)
    many = client.post("/distribution/batch", json={"obs": batch.tolist()}).json()["results"]
    np.testing.assert_allclose([list(r["probabilities"].values()) for r in many], expected, atol=1e-6)
    best = client.post("/predict_deterministic/batch", json={"obs": batch.tolist()}).json()["results"]
    assert [r["action"] for r in best] == expected.argmax(axis=1).tolist()
    sampled = client.post("/policies/atari/predict", json={"obs": batch[1].tolist()}).json()
    assert sampled["probability"] == pytest.approx(expected[1][sampled["action"]], abs=1e-6)
    raw = client.post("/predict_raw/batch", json={"obs": batch.reshape(3, -1).tolist()}).json()["results"]
    assert [r["probability"] for r in raw] == pytest.approx(
        [expected[i][r["action"]] for i, r in enumerate(raw)], abs=1e-6)


def test_a_dict_observation_reaches_the_model_flattened(client: TestClient, models: Path) -> None:
    obs = {"pos": [0.5, -0.25], "gear": 2}
    flat = gs.flatten(ROBOT_SPACE, {"pos": np.array(obs["pos"], np.float32), "gear": 2})[None]
    expected = softmax(TorchPolicy.from_file(models / "robot.pt2").forward(flat).heads[0])[0]
    answer = client.post("/policies/robot/distribution", json={"obs": obs})
    assert list(answer.json()["probabilities"].values()) == pytest.approx(expected.tolist(), abs=1e-6)
    batch = client.post("/policies/robot/predict/batch", json={"obs": [obs, obs | {"gear": 0}]})
    assert batch.status_code == 200 and len(batch.json()["results"]) == 2


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/predict", {"obs": images(1)[0].tolist()[:7]}, "body.obs"),
        ("/predict/batch", {"obs": [images(1)[0].tolist(), [[[0]] * 8] * 7 + [[[0]] * 7 + [[300]]]]}, "body.obs.1.7.7.0"),
        ("/distribution", {"obs": [[[0]] * 8] * 3 + [[[0]] * 2 + [[1.5]] + [[0]] * 5] + [[[0]] * 8] * 4}, "body.obs.3.2.0"),
        ("/predict", {"obs": images(1)[0].tolist(), "extra": 1}, "body.extra"),
        ("/predict_raw", {"obs": [0.5] + [0] * 63}, "body.obs"),
        ("/policies/robot/predict", {"obs": {"pos": [0, 2], "gear": 0}}, "body.obs.pos.1"),
        ("/policies/robot/predict", {"obs": {"pos": [0, 0]}}, "body.obs.gear"),
        ("/policies/robot/predict_deterministic/batch", {"obs": [{"pos": [0, 0], "gear": 3}]}, "body.obs.0.gear"),
        ("/policies/robot/predict", {"obs": {"pos": [0, 0], "gear": 1}, "action_mask": [True, False]},
         "body.action_mask"),
        ("/policies/robot/predict/batch", {"obs": [{"pos": [0, 0], "gear": 1}], "action_mask": [[True] * 3] * 2},
         "body.action_mask"),
    ],
)
def test_a_bad_observation_is_422_naming_its_first_bad_value(
    client: TestClient, path: str, body: dict[str, Any], field: str
) -> None:
    assert_422_naming(client.post(path, json=body), field)


def test_openapi_documents_the_nested_arrays_of_the_space(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    image = schemas["AtariSpaceObservation"]["properties"]["obs"]
    assert (image["minItems"], image["items"]["maxItems"], image["items"]["items"]["maxItems"]) == (8, 8, 1)
    assert image["items"]["items"]["items"] == {"type": "integer", "minimum": 0, "maximum": 255}
    batch = schemas["AtariSpaceObservationBatch"]["properties"]["obs"]
    assert batch["items"]["minItems"] == 8 and batch["minItems"] == 1
    robot = schemas["RobotSpaceObservation"]["properties"]["obs"]
    assert robot["required"] == ["gear", "pos"] and robot["properties"]["gear"]["maximum"] == 2
    assert schemas["AtariSpaceCollectExperience"]["properties"]["observation"]["minItems"] == 8


def test_a_cnn_on_uint8_images_trains_one_ppo_update(client: TestClient) -> None:
    frames = images(9, seed=3)
    fragment = {"model_version": 0, "observations": frames.tolist(), "actions": [0, 1, 2, 3, 0, 1, 2, 3],
                "rewards": [1.0] * 8, "terminated": True}
    bad = client.post("/train/experience", json={"client_id": "c", "fragments": [
        fragment | {"observations": frames.tolist()[:8] + [[[[256]] * 8] * 8]}]})
    assert_422_naming(bad, "body.fragments.0.observations.8.0.0.0")
    before = client.post("/distribution", json={"obs": frames[0].tolist()}).json()
    answer = client.post("/train/experience", json={"client_id": "c", "fragments": [fragment]})
    assert answer.status_code == 200 and answer.json()["accepted"] == 8, answer.text
    wait_until(lambda: client.get("/train/status").json()["model_version"] >= 1, 30, 0.05, "no PPO update")
    after = client.post("/distribution", json={"obs": frames[0].tolist()}).json()
    assert after["model_version"] >= 1 and after["probabilities"] != before["probabilities"]
    collected = client.post("/collect_experience", json={"observation": frames[1].tolist(), "reward": 0.0})
    assert collected.status_code == 200 and collected.json()["action"] in range(4)
