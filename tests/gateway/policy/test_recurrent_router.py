"""A recurrent policy over HTTP (TestClient, local backend): the state round trip, the state kept per
episode id, its expiry, batch rows with their own states, states of the wrong shape, and action
masks (a schema's mask observation, `action_mask`) applied on every route as on the feed-forward ones."""

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


# --- action masks: as on the feed-forward routes (a schema's mask observation, `action_mask`) ---

LEGAL = [False, True, False, True]  # board: actions 1 and 3 only
MD_MASK = [False, True, True, True, False]  # md, nvec [3, 2]: component 0 in {1, 2}, component 1 = 0
DRAWS = 200


class TwoHeads(torch.nn.Module):
    """A multi_discrete (nvec [3, 2]) recurrent policy: the LSTM's 5 logits split in two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = LSTMPolicy(3, H, 5)

    def forward(self, obs: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, h1, c1 = self.lstm(obs, h, c)
        return logits[:, :3], logits[:, 3:], h1, c1


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, LSTMPolicy]]:
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("masked")
    board, two = LSTMPolicy(3, H, 4), TwoHeads()
    state = board.state_shapes()
    x = {"x": {"type": "List[float]", "min_items": 3, "max_items": 3}}
    schema = {"parameters": {"api_key": API_KEY, "default_policy": "board"}, "policies": {
        "board": {"model": str(export_recurrent(board, 3, state, folder / "board.pt", "torchscript")),
                  "observations": x | {"legal": {"type": "List[bool]"}},
                  "action_space": {"type": "discrete", "mask": "legal"}, "recurrent": {"state": state}},
        "md": {"model": str(export_recurrent(two, 3, state, folder / "md.pt", "torchscript")), "observations": x,
               "action_space": {"type": "multi_discrete"}, "recurrent": {"state": state}}}}
    (folder / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    app = build_app(Settings(schema_path=folder / "schema.yaml", backend="local", gateway_metrics_port=0, seed=0))
    with TestClient(app, headers={"access-token": API_KEY}) as c:
        yield c, board


def test_a_recurrent_policy_answers_only_actions_its_mask_allows_on_every_route(masked) -> None:
    client, module = masked
    (p, h), = reference(module, [OBS[0]])
    dist = client.post("/distribution", json={"x": OBS[0], "legal": LEGAL}).json()
    assert dist["probabilities"]["0"] == dist["probabilities"]["2"] == 0.0  # exactly, as feed-forward
    allowed = p[1] + p[3]
    assert dist["probabilities"]["1"] == pytest.approx(p[1] / allowed, abs=1e-5)
    np.testing.assert_allclose(dist["state"]["h"], h, atol=1e-5)  # the state advances as without a mask
    body = {"x": OBS[1], "legal": LEGAL, "state": dist["state"]}
    expected = client.post("/distribution", json=body).json()["probabilities"]
    for _ in range(DRAWS):  # from one carried state: each draw from the same masked distribution
        answer = client.post("/predict", json=body).json()
        assert answer["action"] in (1, 3)
        assert answer["log_prob"] == pytest.approx(np.log(expected[str(answer["action"])]), abs=1e-5)
    raw = {"obs": OBS[1], "action_mask": LEGAL, "state": dist["state"]}
    assert {client.post("/predict_raw", json=raw).json()["action"] for _ in range(DRAWS)} <= {1, 3}
    best = client.post("/predict_deterministic", json=body).json()
    assert best["action"] == max((1, 3), key=lambda a: expected[str(a)])
    rng = np.random.default_rng(0)
    rows = [{"x": rng.normal(size=3).tolist(), "legal": LEGAL} for _ in range(DRAWS)]
    for route in ("/predict/batch", "/predict_deterministic/batch"):
        results = client.post(route, json={"observations": rows}).json()["results"]
        assert {r["action"] for r in results} <= {1, 3}
    dists = client.post("/distribution/batch", json={"observations": rows}).json()["results"]
    assert all(d["probabilities"]["0"] == d["probabilities"]["2"] == 0.0 for d in dists)


def test_a_multi_discrete_recurrent_policy_masks_each_component(masked) -> None:
    client, _ = masked
    body = {"x": OBS[2], "action_mask": MD_MASK}
    dist = client.post("/policies/md/distribution", json=body).json()
    assert dist["components"][0]["0"] == dist["components"][1]["1"] == 0.0
    assert dist["components"][1]["0"] == 1.0
    for route in ("predict", "predict_deterministic"):
        results = client.post(f"/policies/md/{route}/batch", json={"observations": [body] * DRAWS}).json()["results"]
        assert all(r["action"][0] in (1, 2) and r["action"][1] == 0 for r in results)
    drawn = client.post("/policies/md/predict", json=body).json()
    assert drawn["probability"] == pytest.approx(dist["components"][0][str(drawn["action"][0])], abs=1e-6)
    raw = client.post("/policies/md/predict_raw", json={"obs": OBS[2], "action_mask": MD_MASK}).json()
    assert raw["action"][0] in (1, 2) and raw["action"][1] == 0


def test_a_mask_that_allows_nothing_is_a_422_naming_it_and_advances_no_state(masked) -> None:
    client, _ = masked
    nothing = {"x": OBS[0], "legal": [False] * 4}
    for route in ("/predict", "/predict_deterministic", "/distribution"):
        assert_422_naming(client.post(route, json=nothing | {"episode_id": "refused"}), "body.legal")
    kept = client.post("/distribution", json={"x": OBS[0], "legal": LEGAL, "episode_id": "refused"}).json()
    assert kept["state_reset"] is True  # the refused steps kept no state for the episode
    rows = [{"x": OBS[0], "legal": LEGAL}, nothing]
    for route in ("/predict/batch", "/predict_deterministic/batch", "/distribution/batch"):
        assert_422_naming(client.post(route, json={"observations": rows}), "body.observations.1.legal")
    assert_422_naming(client.post("/predict_raw", json={"obs": OBS[0], "action_mask": [False] * 4}), "body.action_mask")
    error = assert_422_naming(client.post("/policies/md/predict", json={
        "x": OBS[0], "action_mask": [True, True, True, False, False]}), "body.action_mask")
    assert "component 1" in error["message"]
    short = client.post("/predict_raw", json={"obs": OBS[0], "action_mask": [True] * 3})
    assert short.status_code == 422 and "body.action_mask" in short.text
