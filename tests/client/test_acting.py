"""``ActingClient``'s side of PolicyClient against a real server (uvicorn in front of the local
backend): remote and local inference on every kind of policy, weight refreshes, epsilon-greedy DQN."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from client_support import AUTH, OBS_BODIES, cartpole_schema, expected_log_prob, local_app, serving_server
from conftest import API_KEY, BOX_OBS, LPOC_OBS, TUPLE_OBS, multi_policy_schema, running_server

from policy_server.client import PolicyClient
from policy_server.client.acting import BINARY_ABOVE, npy_obs


@pytest.fixture(scope="module")
def serving(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The discrete (lpoc, TorchScript), tuple and box policies; nothing trains."""
    with serving_server(model_dir, tmp_path_factory.mktemp("serving")) as url:
        yield url


@pytest.mark.parametrize("inference", ["remote", "local"])
@pytest.mark.parametrize("policy", ["lpoc", "tuple"])
def test_actions_are_valid_and_log_probs_are_the_servers(serving: str, policy: str, inference: str) -> None:
    obs = OBS_BODIES[policy]
    with PolicyClient(serving, API_KEY, policy=policy, inference=inference, seed=1) as client:
        for _ in range(5):
            action, log_prob, version = client.act(obs)
            assert version == 0
            if policy == "lpoc":
                assert isinstance(action, int) and 0 <= action < 4
            else:
                assert isinstance(action, list) and 0 <= action[0] < 3 and 0 <= action[1] < 2
            assert log_prob == pytest.approx(expected_log_prob(serving, policy, obs, action), abs=1e-5)


@pytest.mark.parametrize("inference", ["remote", "local"])
def test_raw_observations_and_box_actions(serving: str, inference: str) -> None:
    with PolicyClient(serving, API_KEY, policy="box", inference=inference, seed=1) as client:
        for obs in ([0.1, -0.3, 0.0], np.array([0.1, -0.3, 0.0], dtype=np.float32), BOX_OBS):
            action, log_prob, _ = client.act(obs)
            assert isinstance(action, list) and len(action) == 2
            assert all(-0.5 <= a <= 0.5 for a in action)
            assert log_prob is not None and math.isfinite(log_prob)


def test_local_sampling_follows_the_servers_distribution(serving: str) -> None:
    with PolicyClient(serving, API_KEY, policy="lpoc", inference="local", seed=3) as client:
        counts = np.bincount([client.act(LPOC_OBS).action for _ in range(2000)], minlength=4)
    answer = httpx.post(f"{serving}/policies/lpoc/distribution", json=LPOC_OBS, headers=AUTH).json()
    expected = np.array([answer["probabilities"][n] for n in ("up", "right", "down", "left")])
    np.testing.assert_allclose(counts / 2000, expected, atol=0.04)


def test_local_inference_refreshes_when_the_server_version_changes(model_dir: Path, tmp_path: Path) -> None:
    app = local_app(multi_policy_schema(model_dir), tmp_path)
    with running_server(app) as url, PolicyClient(url, API_KEY, policy="tuple", fragment_steps=5) as client:
        client.act(TUPLE_OBS)
        assert client.local_version == 0 and client.stats.weight_refreshes == 1
        assert client.refresh() is False  # same version: a 304, nothing downloaded
        served = app.state.services["tuple"].backend.policy
        new = {k: v + 0.5 for k, v in served.get_weights().items()}
        served.set_weights(new, 7)
        for _ in range(5):  # the version is checked once per fragment (5 acts), not at every step
            assert client.act(TUPLE_OBS).model_version == 0
        action, log_prob, version = client.act(TUPLE_OBS)
        assert version == 7 and client.local_version == 7 and client.stats.weight_refreshes == 2
        assert log_prob == pytest.approx(expected_log_prob(url, "tuple", TUPLE_OBS, action), abs=1e-5)


def test_dqn_clients_act_epsilon_greedily_with_the_servers_epsilon(tmp_path: Path) -> None:
    app = local_app(cartpole_schema(tmp_path, "dqn"), tmp_path)
    with running_server(app) as url, PolicyClient(url, API_KEY, inference="local", seed=0) as client:
        answer = client.register()
        assert answer["algorithm"] == "dqn" and client.epsilon == answer["exploration"]["epsilon"] == 1.0
        actions = [client.act([0.0, 0.0, 0.02, 0.0]) for _ in range(400)]
        # epsilon 1: uniform actions, each with probability 1/2 under the behaviour policy
        assert 150 < sum(a.action for a in actions) < 250
        assert all(a.log_prob == pytest.approx(math.log(0.5)) for a in actions)
        client.epsilon = 0.0
        greedy = {client.act([0.0, 0.0, 0.02, 0.0]).action for _ in range(20)}
        assert len(greedy) == 1


@pytest.mark.parametrize("binary", [True, None, False])
def test_remote_acting_sends_arrays_as_npy_when_asked_or_when_large(serving: str, binary: bool | None) -> None:
    """binary=True: every array as .npy; None: above BINARY_ABOVE values only (not these 11); the
    answers are the server's either way."""
    obs = np.array(list(LPOC_OBS.values()), dtype=np.float64)  # float64 travels as float32
    with PolicyClient(serving, API_KEY, policy="lpoc", inference="remote", seed=1, binary=binary) as client:
        sent: list[httpx.Request] = []
        client._http._http.event_hooks["request"].append(sent.append)
        action, log_prob, _ = client.act(obs)
        assert log_prob == pytest.approx(expected_log_prob(serving, "lpoc", LPOC_OBS, action), abs=1e-5)
    media = [r.headers.get("content-type") for r in sent if r.url.path.endswith("predict_raw")]
    assert media == (["application/x-npy"] if binary else ["application/json"])


def test_npy_obs_is_a_float32_row_and_keeps_integer_pixels() -> None:
    floats = np.load(io.BytesIO(npy_obs(np.ones((2, 3)))))
    assert floats.dtype == np.float32 and floats.shape == (6,)
    pixels = np.load(io.BytesIO(npy_obs(np.full((84, 84, 4), 7, np.uint8))))
    assert pixels.dtype == np.uint8 and pixels.shape == (84 * 84 * 4,) and BINARY_ABOVE < pixels.size
