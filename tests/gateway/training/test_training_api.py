"""The training and model-download endpoints in-process (TestClient; trainer in the gateway, no Ray)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from conftest import API_KEY, BIG_INT, cart_fragment, free_port, training_schema
from fastapi.testclient import TestClient
from support import wait_until

from policy_server.fields import FLOAT32_LIMIT
from policy_server.gateway.app import build_app
from policy_server.policies.codec import decode_weights
from policy_server.policies.torch_policy import TorchPolicy, load_module
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}


@pytest.fixture()
def client(model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    schema = training_schema(model_dir, tmp_path / "ckpt", ppo={"rollout_samples": 16, "num_minibatches": 2})
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    settings = Settings(schema_path=path, backend="local", gateway_metrics_port=0, seed=0)
    with TestClient(build_app(settings), headers=AUTH) as c:
        yield c


def send(client: TestClient, *fragments: dict[str, Any], client_id: str = "c1") -> Any:
    return client.post("/train/experience", json={"client_id": client_id, "fragments": list(fragments)})


def wait_version(client: TestClient, version: int) -> None:
    wait_until(lambda: client.get("/train/status").json()["model_version"] >= version, 20, 0.02, "no update")


def test_experience_trains_the_policy_and_predict_answers_the_new_version(client: TestClient) -> None:
    registered = client.post("/train/clients", json={"client_id": None, "info": {"env": "CartPole-v1"}}).json()
    assert registered["model_version"] == 0 and registered["algorithm"] == "ppo" and registered["client_id"]
    answer = send(client, cart_fragment(), client_id=registered["client_id"])
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": 16, "rejected": 0, "model_version": 0, "state": "running"}
    wait_version(client, 1)
    obs = {"cart_position": 0.0, "cart_velocity": 0.0, "pole_angle": 0.01, "pole_angular_velocity": 0.0}
    assert client.post("/predict", json=obs).json()["model_version"] == 1
    assert client.get("/version").json() == {"model_version": 1}
    status = client.get("/train/status").json()
    assert status["episodes"] == 1 and status["last_return"] == 16.0 and status["active_clients"] == 1


def test_malformed_experience_is_422_and_never_reaches_the_trainer(client: TestClient) -> None:
    bad = [
        cart_fragment(actions=[2] + [0] * 15),  # out of range
        cart_fragment(observations=[[0.0] * 3] * 17),  # wrong width
        cart_fragment(rewards=[1.0] * 15),  # length mismatch
        cart_fragment(version=5),  # newer than the current version
        cart_fragment(actions=[1] * 15 + [0], action_masks=[[False, True]] * 17),  # its own mask forbids action 0
    ]
    for body in bad:
        response = send(client, body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "invalid_request"
    assert response.json()["error"]["fields"] == [{"field": "body.fragments.0.actions.15",
        "message": "action 0 is one its action mask (body.fragments.0.action_masks.15) forbids"}]
    nan = client.post(
        "/train/experience",
        content=b'{"client_id": "c1", "fragments": [{"model_version": 0, "observations": [[NaN, 0, 0, 0], [0, 0, 0, 0]], '
        b'"actions": [0], "rewards": [1.0]}]}',
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 422
    status = client.get("/train/status").json()
    assert status["samples_received"] == 0 and status["samples_rejected"]["malformed"] == 5 * 16 + 1


CART_OBS = {"cart_position": 0.0, "cart_velocity": 0.0, "pole_angle": 0.01, "pole_angular_velocity": 0.0}


def test_a_reward_of_1e39_is_422_naming_it_and_the_policy_keeps_training_and_serving(client: TestClient) -> None:
    fragment = cart_fragment(steps=8)
    fragment["rewards"][-1] = 1e39  # finite as a 64-bit float, inf as the float32 the trainer computes in
    response = send(client, fragment)
    assert response.status_code == 422, response.text
    assert [f["field"] for f in response.json()["error"]["fields"]] == ["body.fragments.0.rewards.7"]
    status = client.get("/train/status").json()
    assert status["samples_received"] == 0 and status["samples_rejected"]["malformed"] == 8
    assert send(client, cart_fragment(steps=8), cart_fragment(steps=8, seed=1)).status_code == 200
    wait_version(client, 1)
    answer = client.post("/distribution", json=CART_OBS)
    assert answer.status_code == 200 and answer.json()["model_version"] == 1
    assert all(np.isfinite(p) for p in answer.json()["probabilities"].values())


def _with(steps: int = 4, **change: Any) -> dict[str, Any]:
    return cart_fragment(steps=steps) | change


@pytest.mark.parametrize(
    "body,field",
    [
        ({"fragments": [_with(rewards=[-1e39, 1.0, 1.0, 1.0])]}, "body.fragments.0.rewards.0"),
        ({"fragments": [_with(log_probs=[-0.7, -3.5e38, -0.7, -0.7])]}, "body.fragments.0.log_probs.1"),
        ({"fragments": [_with(observations=[[0.0] * 4] * 4 + [[0.0, 0.0, 1e39, 0.0]])]},
         "body.fragments.0.observations.4.raw.2"),
        ({"fragments": [_with(observations=[CART_OBS] * 4 + [CART_OBS | {"pole_angle": 1e39}])]},
         "body.fragments.0.observations.4.pole_angle"),
        ({"fragments": [_with(observations=[CART_OBS] * 4 + [CART_OBS | {"pole_angle": "0.1"}])]},
         "body.fragments.0.observations.4.pole_angle"),
        ({"fragments": [_with(actions=[0, 1, True, 0])]}, "body.fragments.0.actions.2"),
        ({"fragments": [_with(actions=[0, 1, BIG_INT, 0])]}, "body.fragments.0.actions.2.index"),
        ({"fragments": [_with(model_version=BIG_INT)]}, "body.fragments.0.model_version"),
        ({"fragments": [_with(terminated="yes")]}, "body.fragments.0.terminated"),
        ({"steps": [{"obs": [0.0] * 4, "action": 0, "reward": 1e39, "next_obs": [0.0] * 4, "model_version": 0}]},
         "body.steps.0.reward"),
    ],
)
def test_experience_the_model_cannot_hold_is_422_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    response = client.post("/train/experience", json={"client_id": "c1"} | body)
    assert response.status_code == 422, response.text
    assert field in [f["field"] for f in response.json()["error"]["fields"]]
    assert client.get("/train/status").json()["samples_received"] == 0


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/train/clients", {"client_id": 5}, "body.client_id"),
        ("/train/clients", {"client_id": "c", "info": "x"}, "body.info"),
        ("/train/resume", {"checkpoint": 1}, "body.checkpoint"),
        ("/train/resume", {"checkpoint": None, "extra": 1}, "body.extra"),
    ],
)
def test_training_requests_take_json_types_strictly(client: TestClient, path: str, body: dict[str, Any], field: str) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 422 and field in [f["field"] for f in response.json()["error"]["fields"]]


def test_openapi_declares_the_width_of_raw_experience_observations(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    ref = spec["paths"]["/train/experience"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/CartExperienceRequest")
    fragment = spec["components"]["schemas"]["CartFragment"]["properties"]
    raw, named = fragment["observations"]["items"]["oneOf"]
    assert raw["minItems"] == raw["maxItems"] == 4 and named["type"] == "object"
    assert fragment["rewards"]["items"]["exclusiveMaximum"] == FLOAT32_LIMIT


def test_a_model_version_from_the_future_is_422_naming_the_body(client: TestClient) -> None:
    future = send(client, cart_fragment(version=7))
    assert future.status_code == 422, future.text
    error = future.json()["error"]
    assert [f["field"] for f in error["fields"]] == ["body"] and "model_version 7 is newer" in error["message"]


def test_stale_and_paused_are_409_with_distinct_codes(client: TestClient) -> None:
    send(client, cart_fragment())
    wait_version(client, 1)
    send(client, cart_fragment(version=1))
    wait_version(client, 2)
    stale = send(client, cart_fragment(version=0))
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "stale_samples"
    assert client.post("/train/pause").json()["state"] == "paused"
    paused = send(client, cart_fragment(version=2))
    assert paused.status_code == 409 and paused.json()["error"]["code"] == "training_not_running"
    assert client.post("/train/start").json()["state"] == "running"
    assert send(client, cart_fragment(version=2)).status_code == 200


def test_save_list_resume_and_bad_checkpoint_names(client: TestClient) -> None:
    send(client, cart_fragment())
    wait_version(client, 1)
    saved = client.post("/train/save").json()
    assert saved["model_version"] == 1
    names = [c["name"] for c in client.get("/train/checkpoints").json()["checkpoints"]]
    assert saved["checkpoint"] in names
    resumed = client.post("/train/resume", json={"checkpoint": saved["checkpoint"]}).json()
    assert resumed["model_version"] == 2 and resumed["updates"] == 1  # the same weights, a new version
    assert client.post("/train/resume", json={"checkpoint": "nope"}).status_code == 404
    bad = client.post("/train/resume", json={"checkpoint": "../../etc/passwd"})
    assert bad.status_code == 422 and "invalid checkpoint name" in bad.json()["error"]["message"]
    assert [f["field"] for f in bad.json()["error"]["fields"]] == ["body.checkpoint"]
    empty = client.post("/train/resume", json={"checkpoint": ""})  # no name, not the newest
    assert empty.status_code == 422 and empty.json()["error"]["fields"][0]["field"] == "body.checkpoint"
    documented = client.get("/openapi.json").json()["components"]["schemas"]["Resume"]["properties"]["checkpoint"]
    assert re.search(documented["pattern"], saved["checkpoint"]) and not re.search(documented["pattern"], "../x")
    stopped = client.post("/train/stop").json()
    assert stopped["state"] == "stopped" and stopped["last_checkpoint"] == "final"


def test_model_and_weights_download_reproduce_the_served_policy(client: TestClient, model_dir: Path) -> None:
    send(client, cart_fragment())
    wait_version(client, 1)
    model = client.get("/model")
    assert model.headers["x-model-format"] == "export"
    weights = client.get("/weights")
    assert weights.headers["etag"] == '"1"'
    body = weights.json()
    local = TorchPolicy(load_module(model.content, "export"))
    local.set_weights(decode_weights(body["weights"]), body["model_version"])
    obs = np.array([[0.01, -0.02, 0.03, 0.0]], dtype=np.float32)
    served = client.post("/predict_raw", json={"obs": obs[0].tolist()}).json()
    logits = local.forward(obs).heads[0][0]
    expected = logits[served["action"]] - np.log(np.exp(logits).sum())
    assert served["log_prob"] == pytest.approx(expected, abs=1e-5)
    assert client.get("/weights", headers={"If-None-Match": '"1"'}).status_code == 304
    assert client.get("/weights", headers={"If-None-Match": '"0"'}).status_code == 200


def test_untrained_policies_say_so_and_training_needs_the_key(client: TestClient) -> None:
    response = client.get("/policies/lpoc/train/status")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_trainable"
    assert client.get("/policies/lpoc/weights").status_code == 200
    assert client.get("/train/status", headers={"access-token": "wrong"}).status_code == 403
    public = client.get("/schema").json()["policies"]["cart"]["training"]
    assert public["algorithm"] == "ppo" and public["checkpoint_dir"] == "ckpt"


def test_dqn_trains_from_steps_and_hands_out_a_decaying_epsilon(model_dir: Path, tmp_path: Path) -> None:
    dqn = {"learning_starts": 32, "batch_size": 16, "train_frequency": 4, "publish_frequency": 2,
           "exploration_samples": 128, "buffer_size": 256}
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(training_schema(model_dir, tmp_path / "ckpt", algorithm="dqn", dqn=dqn)))
    settings = Settings(schema_path=path, backend="local", gateway_metrics_port=0, seed=0)
    with TestClient(build_app(settings), headers=AUTH) as client:
        first = client.post("/train/clients", json={"client_id": "q"}).json()
        assert first["algorithm"] == "dqn" and first["exploration"]["epsilon"] == 1.0
        rng = np.random.default_rng(0)
        obs = rng.uniform(-0.05, 0.05, (65, 4))
        steps = [
            {"obs": obs[i].tolist(), "action": int(rng.integers(2)), "reward": 1.0, "next_obs": obs[i + 1].tolist(),
             "terminated": i % 16 == 15, "model_version": 0}
            for i in range(64)
        ]
        assert client.post("/train/experience", json={"client_id": "q", "steps": steps}).json()["accepted"] == 64
        wait_version(client, 1)
        status = client.get("/train/status").json()
        assert status["last_update"]["gradient_steps"] >= 2 and status["episodes"] == 4
        assert 0.05 <= client.post("/train/clients/q/heartbeat").json()["exploration"]["epsilon"] < 1.0


def test_gateway_metrics_label_training_routes_with_their_full_path_and_policy(
    model_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(training_schema(model_dir, tmp_path / "ckpt"), sort_keys=False))
    port = free_port()
    settings = Settings(schema_path=path, backend="local", gateway_metrics_port=port, seed=0)
    with TestClient(build_app(settings), headers=AUTH) as c:
        assert send(c, cart_fragment()).status_code == 200
        assert c.get("/train/status").status_code == 200
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'policy_server_requests_total{endpoint="/train/experience",policy="cart",status="200"} 1.0' in text
    assert 'policy_server_requests_total{endpoint="/train/status",policy="cart",status="200"} 1.0' in text


@pytest.mark.parametrize("rewards", [
    [3e38] * 16,  # each valid float32 (the gateway accepts it); their discounted sums overflow
    [1.0] * 15 + [3e38],  # the case: only the last one is huge
])
def test_huge_finite_rewards_skip_the_update_and_predict_keeps_answering(
    client: TestClient, rewards: list[float]
) -> None:
    obs = {"cart_position": 0.0, "cart_velocity": 0.0, "pole_angle": 0.01, "pole_angular_velocity": 0.0}
    before = client.post("/distribution", json=obs).json()
    assert send(client, cart_fragment(rewards=rewards)).status_code == 200

    def skipped() -> dict[str, Any] | None:
        status = client.get("/train/status").json()
        return status if status["skipped_updates"] >= 1 else None

    status = wait_until(skipped, 20, 0.02, "the update was neither taken nor skipped")
    assert status["model_version"] == 0 and status["updates"] == 0 and status["state"] == "running"
    assert "update skipped, model version 0 kept: non-finite" in status["last_error"]
    for _ in range(3):
        answer = client.post("/predict", json=obs)
        assert answer.status_code == 200 and answer.json()["model_version"] == 0
    assert client.post("/distribution", json=obs).json() == before
    assert all(0 < p < 1 for p in before["probabilities"].values())
    # no periodic checkpoint; a "best" one holds the kept weights (tests/training/test_trainer.py)
    assert {c["name"] for c in client.get("/train/checkpoints").json()["checkpoints"]} <= {"best"}

    assert send(client, cart_fragment()).status_code == 200  # training goes on
    wait_version(client, 1)
    answer = client.post("/distribution", json=obs)
    assert answer.status_code == 200 and answer.json() != before
    assert client.get("/train/status").json()["skipped_updates"] == 1
