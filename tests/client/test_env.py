"""``run_env``: a Gymnasium environment played with a PolicyClient against a real server that trains."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import httpx
import numpy as np
import pytest
import torch
from client_support import local_app, trainable_server
from conftest import API_KEY, running_server
from gymnasium.vector import AutoresetMode

from policy_server.client import EnvStats, PolicyClient, SpaceMismatch, run_env
from policy_server.export import MLPPolicy, export_module
from policy_server.schema.gym_spaces import describe_space


@pytest.fixture()
def trainable(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A CartPole policy that the server trains with PPO (64 samples per update)."""
    with trainable_server(tmp_path) as server:
        yield server


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


def test_mean_return_of_all_or_the_last_episodes() -> None:
    stats = EnvStats(returns=[10.0, 20.0, 60.0])
    assert stats.mean_return() == 30.0 and stats.mean_return(last=2) == 40.0
    assert EnvStats().mean_return() is None


class Recording(PolicyClient):
    """A PolicyClient that keeps the path and JSON body of every request it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[str, Any]] = []

    def request(self, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None,
                content: bytes | None = None) -> httpx.Response:
        self.sent.append((path, json))
        return super().request(method, path, json, headers, content)

    def posted(self, path: str) -> list[Any]:
        return [body for sent, body in self.sent if sent == path]


class CountSteps(gym.vector.VectorWrapper):
    def __init__(self, env: gym.vector.VectorEnv) -> None:
        super().__init__(env)
        self.vector_steps = 0

    def step(self, actions: Any) -> Any:
        self.vector_steps += 1
        return super().step(actions)


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One CartPole server (Pathmind observations, PPO) for the tests below: its URL."""
    with trainable_server(tmp_path_factory.mktemp("cartpole")) as (url, _):
        yield url


def logged_steps(client: Recording) -> list[dict[str, Any]]:
    return [frag for body in client.posted("/train/experience") for frag in body["fragments"]]


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED])
def test_a_vector_env_asks_once_per_vector_step_and_logs_each_sub_envs_episodes(cartpole: str, mode: AutoresetMode) -> None:
    envs = CountSteps(gym.make_vec("CartPole-v1", num_envs=3, vectorization_mode="sync",
                                   vector_kwargs={"autoreset_mode": mode}))
    with Recording(cartpole, API_KEY, inference="remote", fragment_steps=10_000, seed=0) as client:
        stats = run_env(client, envs, max_episodes=4, seed=3)
    envs.close()
    assert len(client.posted("/predict_raw/batch")) == envs.vector_steps  # one request per vector step
    fragments = logged_steps(client)
    rewards = [r for frag in fragments for r in frag["rewards"]]
    # CartPole pays 1 for every real step; a NEXT_STEP reset step (reward 0) is never logged
    assert len(rewards) == stats.steps == client.stats.samples_accepted and set(rewards) == {1.0}
    ends = [frag for frag in fragments if frag["terminated"] or frag["truncated"]]
    assert len(ends) == stats.episodes >= 4 and sum(stats.lengths) <= stats.steps
    for frag in fragments:  # an episode's last observation is the one that ended it, not the next start
        assert len(frag["observations"]) == len(frag["rewards"]) + 1
        if frag["terminated"]:
            x, _, theta, _ = frag["observations"][-1]
            assert abs(x) > 2.4 or abs(theta) > 0.2094


def test_a_step_where_every_sub_env_resets_asks_nothing(cartpole: str) -> None:
    envs = CountSteps(gym.make_vec("CartPole-v1", num_envs=1, vectorization_mode="sync"))
    with Recording(cartpole, API_KEY, inference="remote", fragment_steps=10_000, seed=0) as client:
        stats = run_env(client, envs, max_episodes=2, seed=4)
    envs.close()
    # the step after the first episode's end is its reset: no request, no logged step
    assert len(client.posted("/predict_raw/batch")) == envs.vector_steps - 1 == stats.steps
    assert stats.episodes == 2 and sum(stats.lengths) == stats.steps


def test_an_async_vector_env_plays_with_local_inference(cartpole: str) -> None:
    envs = gym.vector.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2)
    with PolicyClient(cartpole, API_KEY, inference="local", fragment_steps=16, seed=0) as client:
        stats = run_env(client, envs, max_steps=40, seed=5)
    envs.close()
    assert 40 <= stats.steps < 42 and client.stats.steps_logged == stats.steps == client.stats.samples_accepted


class ThreeActions(gym.Wrapper[Any, Any, Any, Any]):
    """CartPole's observations with a third action that the server's policy does not have."""

    def __init__(self, env: gym.Env[Any, Any]) -> None:
        super().__init__(env)
        self.action_space = gym.spaces.Discrete(3)


@pytest.mark.parametrize(("env", "says"), [
    (lambda: gym.make("Acrobot-v1"), "flattens to 6 values, policy default takes 4"),
    (lambda: ThreeActions(gym.make("CartPole-v1")),
     "the environment's action space Discrete(3) is not policy default's action_space {'type': 'discrete', 'n': 2}"),
    (lambda: gym.make_vec("Acrobot-v1", num_envs=2, vectorization_mode="sync"), "flattens to 6 values"),
])
def test_run_env_refuses_an_environment_the_server_does_not_serve_before_its_first_step(
    cartpole: str, env: Any, says: str
) -> None:
    made = env()
    with PolicyClient(cartpole, API_KEY, inference="remote") as client, pytest.raises(SpaceMismatch) as refused:
        run_env(client, made, max_steps=5)
    made.close()
    assert says in str(refused.value) and client.stats.steps_logged == 0


class DictObs(gym.Env[dict[str, Any], int]):
    """A Dict observation (a small uint8 image, a gear, a speed); 3 actions; 5-step episodes."""

    observation_space = gym.spaces.Dict({
        "image": gym.spaces.Box(0, 255, (3, 3, 1), np.uint8),
        "gear": gym.spaces.Discrete(4),
        "speed": gym.spaces.Box(-1.0, 1.0, (1,), np.float32),
    })
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        self.observation_space.seed(seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action: int) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        self.t += 1
        return self.observation_space.sample(), float(action), self.t >= 5, False, {}


def test_a_dict_observation_env_plays_in_its_spaces_json_form(tmp_path: Path) -> None:
    torch.manual_seed(0)
    space = DictObs.observation_space
    model = export_module(MLPPolicy(gym.spaces.flatdim(space), [8], nvec=[3]), gym.spaces.flatdim(space),
                          tmp_path / "dict.pt2")
    schema = {"observation_space": describe_space(space),
              "parameters": {"api_key": API_KEY, "model": str(model), "action_space": {"type": "discrete", "n": 3},
                             "training": {"algorithm": "ppo", "ppo": {"rollout_samples": 64},
                                          "checkpoint_dir": str(tmp_path / "checkpoints")}}}
    with running_server(local_app(schema, tmp_path)) as url:
        for inference in ("remote", "local"):
            envs = gym.vector.SyncVectorEnv([DictObs] * 2)
            with Recording(url, API_KEY, inference=inference, fragment_steps=8, seed=0) as client:  # type: ignore[arg-type]
                stats = run_env(client, envs, max_episodes=4, seed=0)
            envs.close()
            assert stats.episodes >= 4 and client.stats.samples_accepted == stats.steps
            logged = logged_steps(client)[0]["observations"][0]
            asked = client.posted("/predict/batch")
            for obs in [logged, *(body["obs"][0] for body in asked[:1])]:  # the space's JSON form
                assert sorted(obs) == ["gear", "image", "speed"] and isinstance(obs["gear"], int)
                assert np.asarray(obs["image"]).shape == (3, 3, 1) and isinstance(obs["image"][0][0][0], int)
                assert len(obs["speed"]) == 1
            assert bool(asked) == (inference == "remote")


class Legal(gym.Env[dict[str, Any], int]):
    """A Dict observation whose ``legal`` key is the action mask (at least one of 4 actions legal);
    counts the illegal actions it is handed."""

    observation_space = gym.spaces.Dict({
        "pos": gym.spaces.Box(-1.0, 1.0, (3,), np.float32),
        "legal": gym.spaces.MultiBinary(4),
    })
    action_space = gym.spaces.Discrete(4)
    illegal = 0

    def _observe(self) -> dict[str, Any]:
        obs = self.observation_space.sample()
        obs["legal"][self.np_random.integers(4)] = 1
        self.obs = obs
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        self.observation_space.seed(seed)
        return self._observe(), {}

    def step(self, action: int) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        Legal.illegal += int(not self.obs["legal"][action])
        return self._observe(), 1.0, False, False, {}


def test_a_mask_in_a_dict_observation_keeps_every_action_legal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = export_module(MLPPolicy(3, [8], nvec=[4]), 3, tmp_path / "masked.pt2")
    schema = {"observation_space": describe_space(Legal.observation_space),
              "parameters": {"api_key": API_KEY, "model": str(model),
                             "action_space": {"type": "discrete", "n": 4, "mask": "legal"}}}
    with running_server(local_app(schema, tmp_path)) as url:
        for inference in ("remote", "local"):
            Legal.illegal = 0
            envs = gym.vector.SyncVectorEnv([Legal] * 4)
            with PolicyClient(url, API_KEY, inference=inference, seed=0) as client:  # type: ignore[arg-type]
                stats = run_env(client, envs, max_steps=200, seed=0, train=False)
            envs.close()
            assert stats.steps == 200 and Legal.illegal == 0, inference


def test_an_environment_with_infinite_bounds_passes_the_check(tmp_path: Path) -> None:
    """CartPole's Box has infinite bounds, which `GET /schema` writes as null (JSON has no
    infinity): the client reads them back as infinite, so the schema `schema --env` writes plays."""
    env = gym.make("CartPole-v1")
    model = export_module(MLPPolicy(4, [8], nvec=[2]), 4, tmp_path / "cart.pt2")
    schema = {"observation_space": describe_space(env.observation_space),
              "parameters": {"api_key": API_KEY, "model": str(model), "action_space": {"type": "discrete", "n": 2}}}
    with running_server(local_app(schema, tmp_path)) as url:
        assert None in httpx.get(f"{url}/schema", headers={"access-token": API_KEY}).json()["policies"]["default"][
            "observation_space"]["high"]
        for inference in ("remote", "local"):
            with PolicyClient(url, API_KEY, inference=inference, seed=0) as client:
                stats = run_env(client, env, max_steps=20, seed=0, train=False)
            assert stats.steps == 20
        with PolicyClient(url, API_KEY, seed=0) as client, \
                pytest.raises(ValueError, match="has no `training` section.*pass train=False"):
            run_env(client, env, max_steps=20, seed=0)  # nothing trains it: refused before a step
    env.close()


class Frames(gym.Env[np.ndarray, int]):
    """84×84×4 uint8 frames of noise, episodes of 10 steps."""

    observation_space = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.t = 0
        return self.np_random.integers(0, 256, (84, 84, 4), dtype=np.uint8), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.t += 1
        return self.np_random.integers(0, 256, (84, 84, 4), dtype=np.uint8), float(action), self.t >= 10, False, {}


def test_image_experience_goes_out_in_posts_under_the_body_limit(tmp_path: Path) -> None:
    """60 steps of 84×84×4 frames are ~7 MB of JSON: the client posts them a few steps at a time
    (POST_VALUES), never over the server's 4 MiB limit, and the server accepts every step."""
    from policy_server.export import CNNPolicy

    torch.manual_seed(0)
    model = export_module(CNNPolicy((84, 84, 4), 2), (84, 84, 4), tmp_path / "cnn", dtype=torch.uint8)
    schema = {"observation_space": describe_space(Frames.observation_space),
              "parameters": {"api_key": API_KEY, "model": str(model), "action_space": {"type": "discrete", "n": 2},
                             "training": {"algorithm": "ppo", "ppo": {"rollout_samples": 512},
                                          "checkpoint_dir": str(tmp_path / "checkpoints")}}}
    with running_server(local_app(schema, tmp_path)) as url, \
            PolicyClient(url, API_KEY, inference="local", seed=0) as client:
        stats = run_env(client, Frames(), max_steps=60, seed=0)
    assert stats.steps == 60 and client.stats.samples_accepted == 60
    assert client.stats.posts >= 60 // 5
