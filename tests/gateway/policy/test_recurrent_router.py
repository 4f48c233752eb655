"""A recurrent policy over HTTP (TestClient, local backend): the state round trip, the state kept per
episode id, its expiry, batch rows with their own states, and states of the wrong shape."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import API_KEY, assert_422_naming
from fastapi.testclient import TestClient
from support import wait_until

from policy_server.gateway.app import build_app
from policy_server.policies.lstm import LSTMPolicy, export_recurrent
from policy_server.settings import Settings

H = 4
OBS = [[0.5, -1.0, 2.0], [1.0, 0.0, -0.5], [-2.0, 0.3, 0.1]]


@pytest.fixture(scope="module")
def lstm(tmp_path_factory: pytest.TempPathFactory) -> tuple[LSTMPolicy, Path]:
    torch.manual_seed(0)
    module = LSTMPolicy(3, H, 2)
    return module, export_recurrent(module, 3, module.state_shapes(), tmp_path_factory.mktemp("m") / "lstm.pt", "torchscript")


@pytest.fixture(scope="module")
def client(lstm: tuple[LSTMPolicy, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    module, model = lstm

    def policy(**recurrent: Any) -> dict[str, Any]:
        return {"observations": {"x": {"type": "List[float]", "min_items": 3, "max_items": 3}},
                "model": str(model), "action_space": {"type": "discrete", "n": 2},
                "recurrent": {"state": module.state_shapes(), **recurrent}}

    folder = tmp_path_factory.mktemp("schema")
    learn = policy(bptt_steps=2) | {"training": {"checkpoint_dir": str(folder / "ckpt"), "seed": 0,
                                                 "ppo": {"rollout_samples": 6, "num_minibatches": 2}}}
    schema = {"parameters": {"api_key": API_KEY, "default_policy": "mem"},
              "policies": {"mem": policy(max_episodes=3), "short": policy(state_ttl_s=0.3), "learn": learn}}
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    app = build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0, seed=0))
    with TestClient(app, headers={"access-token": API_KEY}) as c:
        yield c


def reference(module: LSTMPolicy, observations: list[list[float]]) -> list[tuple[list[float], np.ndarray]]:
    """Each step's action probabilities and new h, run through the module from the zero state."""
    h = c = torch.zeros(1, 1, H)
    out = []
    with torch.no_grad():
        for obs in observations:
            logits, h, c = module(torch.tensor([obs]), h, c)
            out.append((torch.softmax(logits, -1)[0].tolist(), h[0].numpy()))
    return out


def probs(answer: dict[str, Any]) -> list[float]:
    return list(answer["probabilities"].values())


def test_the_state_an_answer_returns_continues_the_episode_when_sent_back(client: TestClient, lstm) -> None:
    expected = reference(lstm[0], OBS)
    state = None
    for obs, (p, h) in zip(OBS, expected, strict=True):
        answer = client.post("/distribution", json={"x": obs} | ({"state": state} if state else {})).json()
        np.testing.assert_allclose(probs(answer), p, atol=1e-5)
        np.testing.assert_allclose(answer["state"]["h"], h, atol=1e-5)
        assert answer["state_reset"] is False and answer["model_version"] == 0
        state = answer["state"]
    sampled = client.post("/predict", json={"x": OBS[0], "state": state}).json()
    assert sampled["action"] in (0, 1) and set(sampled["state"]) == {"h", "c"}


def test_the_server_keeps_each_episodes_state_by_its_id(client: TestClient, lstm) -> None:
    expected = reference(lstm[0], OBS)
    for i, (obs, (p, _)) in enumerate(zip(OBS, expected, strict=True)):
        for episode in ("a", "b"):  # interleaved episodes do not mix
            answer = client.post("/distribution", json={"x": obs, "episode_id": episode, "episode_start": i == 0}).json()
            np.testing.assert_allclose(probs(answer), p, atol=1e-5)
            assert answer["state_reset"] is False
    restarted = client.post("/distribution", json={"x": OBS[0], "episode_id": "a", "episode_start": True}).json()
    np.testing.assert_allclose(probs(restarted), expected[0][0], atol=1e-5)


def test_an_unknown_or_expired_episode_id_starts_from_zero_and_says_so(client: TestClient, lstm) -> None:
    zero = reference(lstm[0], [OBS[1]])[0][0]
    unknown = client.post("/policies/short/distribution", json={"x": OBS[1], "episode_id": "new"}).json()
    assert unknown["state_reset"] is True
    np.testing.assert_allclose(probs(unknown), zero, atol=1e-5)
    kept = client.post("/policies/short/distribution", json={"x": OBS[1], "episode_id": "new"}).json()
    assert kept["state_reset"] is False
    time.sleep(0.4)  # past state_ttl_s 0.3: the store forgets the episode
    expired = client.post("/policies/short/distribution", json={"x": OBS[1], "episode_id": "new"}).json()
    assert expired["state_reset"] is True
    np.testing.assert_allclose(probs(expired), zero, atol=1e-5)


def test_batch_rows_with_different_states_equal_each_row_alone(client: TestClient) -> None:
    first = client.post("/distribution/batch", json={"observations": [{"x": o} for o in OBS]}).json()["results"]
    rows = [{"x": OBS[(i + 1) % 3], "state": first[i]["state"]} for i in range(3)]
    together = client.post("/distribution/batch", json={"observations": rows}).json()["results"]
    for row, answer in zip(rows, together, strict=True):
        alone = client.post("/distribution", json=row).json()
        np.testing.assert_allclose(probs(answer), probs(alone), atol=1e-6)
        np.testing.assert_allclose(answer["state"]["c"], alone["state"]["c"], atol=1e-6)
    actions = client.post("/predict_deterministic/batch", json={"observations": rows}).json()["results"]
    assert [a["action"] for a in actions] == [int(np.argmax(probs(a))) for a in together]


def test_a_state_of_the_wrong_shape_is_a_422_naming_it(client: TestClient) -> None:
    error = assert_422_naming(client.post("/predict", json={"x": OBS[0], "state": {"h": [[0.0] * 3], "c": [[0.0] * H]}}),
                              "body.state.h")
    assert "expected shape [1, 4], got [1, 3]" in error["message"]
    rows = [{"x": OBS[0]}, {"x": OBS[1], "state": {"h": [[0.0] * H], "c": [0.0] * H}}]
    nested = client.post("/predict/batch", json={"observations": rows})  # one level short: the request model says
    assert nested.status_code == 422 and nested.json()["error"]["fields"][0]["field"] == "body.observations.1.state.c.0"
    rows[1]["state"]["c"] = [[0.0] * (H + 1)]
    assert_422_naming(client.post("/predict/batch", json={"observations": rows}), "body.observations.1.state.c")
    missing = client.post("/predict", json={"x": OBS[0], "state": {"h": [[0.0] * H]}})
    assert missing.status_code == 422 and "c" in str(missing.json()["error"]["fields"])
    overflow = client.post("/predict", json={"x": OBS[0], "state": {"h": [[1e39] * H], "c": [[0.0] * H]}})
    assert overflow.status_code == 422 and "float32" in overflow.text


def test_experience_of_packed_observation_and_state_rows_trains_the_recurrent_policy(client: TestClient) -> None:
    rows, actions, state = [], [], {"h": [[0.0] * H], "c": [[0.0] * H]}
    for obs in [*OBS, OBS[0]]:  # three steps, then the observation after the last
        rows.append(obs + [v for name in ("h", "c") for v in state[name][0]])
        answer = client.post("/policies/learn/predict", json={"x": obs, "episode_id": "e1"}).json()
        actions.append(answer["action"])
        state = answer["state"]
    fragment = {"model_version": 0, "observations": rows, "actions": actions[:3], "rewards": [0.0, 0.0, 1.0],
                "terminated": True}
    short = client.post("/policies/learn/train/experience", json={"client_id": "c", "fragments": [
        fragment | {"observations": [obs[:3] for obs in rows]}]})
    assert short.status_code == 422 and f"at least {3 + 2 * H} items" in short.text
    for _ in range(2):
        sent = client.post("/policies/learn/train/experience", json={"client_id": "c", "fragments": [fragment]})
        assert sent.status_code == 200, sent.text
    wait_until(lambda: client.get("/policies/learn/train/status").json()["model_version"] >= 1, 30, 0.05, "no update")
    assert client.post("/policies/learn/predict", json={"x": OBS[0]}).json()["model_version"] >= 1
