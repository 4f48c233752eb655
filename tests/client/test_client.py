"""PolicyClient against a real server: uvicorn in front of the local backend (no Ray, no mocks).

Inference (remote and local) on every kind of policy, weight refreshes, experience fragments,
the 409 answers of training, retries with backoff, and ``run_env`` on CartPole-v1.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gymnasium as gym
import httpx
import numpy as np
import pytest
import torch
import uvicorn
import yaml
from conftest import API_KEY, BOX_OBS, LPOC_OBS, TUPLE_OBS, free_port, multi_policy_schema, running_server

from policy_server.client import PolicyClient, PolicyClientError, run_env
from policy_server.export import MLPPolicy, export_module
from policy_server.gateway.app import build_app
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}
CARTPOLE_OBSERVATIONS = {
    name: {"type": "float"} for name in ("cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity")
}
OBS_BODIES = {"lpoc": LPOC_OBS, "tuple": TUPLE_OBS, "box": BOX_OBS}


def local_app(schema: dict[str, Any], folder: Path) -> Any:
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0, seed=0))


@pytest.fixture(scope="module")
def serving(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The discrete (lpoc, TorchScript), tuple and box policies; nothing trains."""
    app = local_app(multi_policy_schema(model_dir), tmp_path_factory.mktemp("serving"))
    with running_server(app) as url:
        yield url


def cartpole_schema(folder: Path, algorithm: str = "ppo", **training: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = export_module(MLPPolicy(4, [16], nvec=[2]), 4, folder / "cartpole.pt2")
    hyper = {"ppo": {"rollout_samples": 64, "num_minibatches": 2, "update_epochs": 2},
             "dqn": {"learning_starts": 10_000}}[algorithm]
    return {
        "observations": CARTPOLE_OBSERVATIONS,
        "parameters": {
            "api_key": API_KEY,
            "model": str(model),
            "action_space": {"type": "discrete", "n": 2, "names": ["left", "right"]},
            "training": {"algorithm": algorithm, algorithm: hyper, "checkpoint_dir": str(folder / "checkpoints"),
                         "seed": 0, **training},
        },
    }


@pytest.fixture()
def trainable(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A CartPole policy that the server trains with PPO (64 samples per update)."""
    app = local_app(cartpole_schema(tmp_path), tmp_path)
    with running_server(app) as url:
        yield url, app


def expected_log_prob(url: str, policy: str, obs: dict[str, Any], action: Any) -> float:
    """The log-probability of ``action`` under the server's exact distribution."""
    answer = httpx.post(f"{url}/policies/{policy}/distribution", json=obs, headers=AUTH).json()
    if "components" in answer:
        return sum(math.log(c[str(a)]) for c, a in zip(answer["components"], action))
    names = httpx.get(f"{url}/").json()["policies"][policy]["action_space"]["names"]
    return math.log(answer["probabilities"][names[action]])


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- inference ----------------------------------------------------------------------------------


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


# --- errors and retries -------------------------------------------------------------------------


def test_a_422_is_raised_at_once_with_the_servers_envelope(serving: str) -> None:
    with PolicyClient(serving, API_KEY, policy="box", inference="remote", max_retries=5) as client:
        with pytest.raises(PolicyClientError) as caught:
            client.act([0.1, 0.2])  # the policy takes 3 values
        assert caught.value.status == 422 and caught.value.code == "invalid_request"
        assert "at least 3 items" in caught.value.message and caught.value.fields
        assert client.stats.retries == 0


def test_a_wrong_key_is_a_403_without_retries(serving: str) -> None:
    with PolicyClient(serving, "wrong", policy="box", inference="remote") as client:
        with pytest.raises(PolicyClientError) as caught:
            client.act([0.1, 0.2, 0.3])
        assert caught.value.status == 403 and client.stats.retries == 0


def test_not_trainable_is_a_404(serving: str) -> None:
    with PolicyClient(serving, API_KEY, policy="box") as client:
        with pytest.raises(PolicyClientError) as caught:
            client.status()
        assert caught.value.status == 404 and caught.value.code == "not_trainable"


@contextmanager
def server_started_later(app: Any, port: int, delay_s: float) -> Iterator[None]:
    """uvicorn on ``port``, started ``delay_s`` seconds from now in a thread."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    def run() -> None:
        time.sleep(delay_s)
        server.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_retries_with_backoff_until_a_briefly_down_server_answers(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    app = local_app(multi_policy_schema(model_dir), tmp_path)
    with server_started_later(app, port, delay_s=1.0):
        client = PolicyClient(f"http://127.0.0.1:{port}", API_KEY, policy="box", inference="remote",
                              max_retries=20, backoff_base_s=0.05, backoff_cap_s=0.5)
        start = time.monotonic()
        action, _, version = client.act([0.1, -0.3, 0.0])
        assert time.monotonic() - start >= 0.9 and client.stats.retries >= 3
        assert version == 0 and len(action) == 2
        client.close()


def test_a_503_while_a_policy_is_unavailable_is_retried_after_its_retry_hint(model_dir: Path, tmp_path: Path) -> None:
    app = local_app(multi_policy_schema(model_dir), tmp_path)
    with running_server(app) as url, PolicyClient(url, API_KEY, policy="box", max_retries=20,
                                                  backoff_base_s=0.05, backoff_cap_s=0.2) as client:
        service = app.state.services["box"]
        backend, service.backend = service.backend, None  # as while its deployment starts: 503
        unavailable = httpx.get(f"{url}/policies/box/version", headers=AUTH)
        assert unavailable.status_code == 503 and unavailable.headers["retry-after"] == "1"
        threading.Timer(1.5, lambda: setattr(service, "backend", backend)).start()
        start = time.monotonic()
        assert client.version() == 0
        assert client.stats.retries >= 2 and time.monotonic() - start >= 1.5  # waited as told, not 0.05 s


def test_gives_up_after_max_retries_with_a_connection_error() -> None:
    client = PolicyClient(f"http://127.0.0.1:{free_port()}", API_KEY, max_retries=2,
                          backoff_base_s=0.01, backoff_cap_s=0.02)
    with pytest.raises(PolicyClientError) as caught:
        client.version()
    assert caught.value.status is None and caught.value.code == "connection_error"
    assert client.stats.retries == 2
    client.close()


# --- experience and training --------------------------------------------------------------------


def test_experience_is_posted_in_fragments_of_consecutive_steps(trainable: tuple[str, Any]) -> None:
    url, _ = trainable
    env = gym.make("CartPole-v1")
    with PolicyClient(url, API_KEY, inference="remote", fragment_steps=16, client_id="frag-1") as client:
        stats = run_env(client, env, max_steps=40, seed=0)
        status = client.status()
    env.close()
    assert stats.steps == 40 and client.stats.posts == 3  # 16 + 16 + the final flush of 8
    assert client.stats.samples_accepted == 40 and client.pending_steps == 0
    assert status["samples_received"] == 40 and status["clients"]["frag-1"]["samples"] == 40
    # the server found the episode ends where the client did: the fragments' flags were right
    assert status["episodes"] == stats.episodes >= 1
    assert status["recent_returns"] == pytest.approx(stats.returns)


def test_run_env_plays_cartpole_and_local_weights_follow_training(trainable: tuple[str, Any]) -> None:
    url, _ = trainable
    env = gym.make("CartPole-v1")
    with PolicyClient(url, API_KEY, inference="local", fragment_steps=32, seed=0) as client:
        stats = run_env(client, env, max_episodes=3, seed=1)
        assert stats.episodes == 3 and len(stats.returns) == 3 and stats.steps == sum(stats.lengths)
        # keep playing until the server has published two updates (64 samples each)
        run_env(client, env, stop=lambda: client.server_version is not None and client.server_version >= 2, seed=2)
        assert client.local_version is not None and client.local_version >= 1
        assert client.stats.weight_refreshes >= 2
        served = client.version()
        client.refresh()
        assert client.local_version >= served
    env.close()


def steps_of(env: Any, client: PolicyClient, n: int, seed: int, version: int | None = None) -> None:
    """Log ``n`` steps of ``env`` (random actions) without posting them."""
    obs, _ = env.reset(seed=seed)
    for _ in range(n):
        action = int(env.action_space.sample())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        client.log_step(obs, action, float(reward), terminated, truncated, next_obs, math.log(0.5), version)
        obs = next_obs if not (terminated or truncated) else env.reset()[0]


def test_stale_experience_is_dropped_and_the_weights_refreshed(trainable: tuple[str, Any]) -> None:
    url, _ = trainable
    env = gym.make("CartPole-v1")
    with PolicyClient(url, API_KEY, inference="local", fragment_steps=64) as client:
        run_env(client, env, stop=lambda: (client.server_version or 0) >= 2, seed=0)
        wait_for(lambda: client.version() >= 2)
        steps_of(env, client, 10, seed=5, version=0)  # acted by version 0: older than 1 behind
        assert client.flush() is None
        assert client.stats.stale_posts == 1 and client.stats.dropped_steps == 10
        assert client.local_version == client.version()
    env.close()


def test_experience_waits_while_training_is_paused(trainable: tuple[str, Any]) -> None:
    url, _ = trainable
    env = gym.make("CartPole-v1")
    with PolicyClient(url, API_KEY, inference="remote", wait_for_training_s=0.3) as client:
        client.act([0.0] * 4)
        assert client.pause()["state"] == "paused"
        steps_of(env, client, 5, seed=0)
        with pytest.raises(PolicyClientError) as caught:
            client.flush()
        assert caught.value.status == 409 and caught.value.code == "training_not_running"
        assert client.stats.not_running_waits == 1 and client.stats.dropped_steps == 5

        client.wait_for_training_s = 30
        threading.Timer(0.5, lambda: httpx.post(f"{url}/train/start", headers=AUTH)).start()
        steps_of(env, client, 5, seed=1)
        start = time.monotonic()
        assert client.flush() is None  # dropped, then waited until training ran again
        assert time.monotonic() - start >= 0.4 and client.training_state == "running"
        assert client.stats.not_running_waits == 2 and client.stats.dropped_steps == 10
        steps_of(env, client, 5, seed=2)
        assert client.flush()["accepted"] == 5
    env.close()


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
