"""A DQN client's epsilon-greedy exploration never takes a masked action: the pure draw
(``client.masks``), then the client against a real server on the local backend (no Ray) playing
the masked example's job scheduler, which raises on an illegal action."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import yaml
from client_support import local_app
from conftest import running_server
from support import load_script

from policy_server.client import PolicyClient, run_env
from policy_server.client.masks import epsilon_greedy, observation_mask
from policy_server.schema.gym_spaces import describe_space

ROOT = Path(__file__).resolve().parents[2]
DRAWS = 1000
FEWER = 300
"""Steps of the variants that take an HTTP request each beside the 1,000-step ones (CI's time):
each step is a random job, illegal for the old client a third to two thirds of the time."""


def test_random_actions_are_drawn_among_the_allowed_ones_only() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((DRAWS, 6)) < 0.4
    masks[np.arange(DRAWS), rng.integers(0, 6, DRAWS)] = True  # each allows at least one action
    actions = [epsilon_greedy(int(np.flatnonzero(m)[0]), [6], 1.0, rng, m)[0] for m in masks]
    assert sum(not m[a] for m, a in zip(masks, actions)) == 0
    # the draw is uniform among the allowed: action 5 when 2 of 6 are allowed, about half the time
    two = np.array([False, False, False, True, False, True])
    fives = sum(epsilon_greedy(3, [6], 1.0, rng, two)[0] == 5 for _ in range(DRAWS))
    assert 430 < fives < 570  # Binomial(1000, 0.5): sd 15.8


def test_multi_discrete_draws_each_component_among_its_allowed_actions() -> None:
    rng = np.random.default_rng(1)
    mask = np.array([False, True, True, True, False])  # component 0: 1 or 2; component 1: 0 only
    drawn = [epsilon_greedy([1, 0], [3, 2], 1.0, rng, mask)[0] for _ in range(DRAWS)]
    assert {tuple(a) for a in drawn} == {(1, 0), (2, 0)}  # type: ignore[arg-type]


@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0])
def test_the_log_prob_is_the_behaviour_policys_and_sums_to_one_over_the_allowed(eps: float) -> None:
    """``eps / |allowed| + (1 - eps) [a = greedy]``: over every action drawn, probabilities sum to 1."""
    rng = np.random.default_rng(2)
    mask = np.array([True, False, True, True, False, False])
    seen: dict[Any, float] = {}
    counts: Counter[Any] = Counter()
    for _ in range(DRAWS):
        action, log_prob = epsilon_greedy(2, [6], eps, rng, mask)
        seen[action], counts[action] = log_prob, counts[action] + 1
    assert set(seen) <= {0, 2, 3}
    assert sum(math.exp(lp) for lp in seen.values()) == pytest.approx(1.0)
    assert seen[2] == pytest.approx(math.log(eps / 3 + 1 - eps))
    for action, n in counts.items():
        assert abs(n / DRAWS - math.exp(seen[action])) < 0.06, (action, n)


def test_a_mask_that_allows_nothing_in_a_component_is_refused() -> None:
    with pytest.raises(ValueError, match="component 1 of the action: the mask allows none of its 2 actions"):
        epsilon_greedy([0, 0], [3, 2], 1.0, np.random.default_rng(0), np.array([True, True, True, False, False]))


def test_the_observation_mask_is_the_schemas_entry_else_action_mask() -> None:
    assert observation_mask({"ready": [1, 0], "action_mask": [0, 1]}, ["ready", "action_mask"]).tolist() == [True, False]
    assert observation_mask({"action_mask": [0, 1]}, ["ready", "action_mask"]).tolist() == [False, True]
    assert observation_mask([0.0, 1.0], ["ready"]) is None and observation_mask({"x": 1}, ["ready"]) is None


# --- against a server ---------------------------------------------------------------------------


def load_scheduler() -> ModuleType:
    return load_script(ROOT / "examples" / "masked" / "scheduler.py", "masked_scheduler")


def dqn_schema(folder: Path, scheduler: ModuleType, form: str) -> dict[str, Any]:
    """The masked example's schema trained by DQN at epsilon 1 (every action random; nothing
    learns: 10,000 samples before the first update): ``pathmind`` (its `ready` field is the mask),
    ``space`` (the env's Dict space, `ready` its mask key) or ``box`` (priorities only; masks come
    as each request's `action_mask`)."""
    schema = yaml.safe_load((ROOT / "examples" / "masked" / "schema.yaml").read_text())
    schema["parameters"]["model"] = str(scheduler.build_models(folder / "models"))
    schema["parameters"]["training"] = {"algorithm": "dqn", "dqn": {"learning_starts": 10_000, "end_epsilon": 1.0},
                                        "checkpoint_dir": str(folder / "checkpoints"), "seed": 0}
    if form != "pathmind":
        del schema["observations"]
        space = scheduler.JobScheduler.observation_space
        schema["observation_space"] = describe_space(space if form == "space" else space["priority"])
    if form == "box":
        del schema["parameters"]["action_space"]["mask"]
    return schema


@pytest.fixture(scope="module")
def scheduler() -> ModuleType:
    return load_scheduler()


def priorities_only(scheduler: ModuleType) -> gym.Env[Any, Any]:
    """The scheduler observed by its priorities; its masks only by ``action_masks()`` (sb3-contrib's way)."""
    env = scheduler.JobScheduler()
    return gym.wrappers.TransformObservation(env, lambda obs: obs["priority"], env.observation_space["priority"])


@pytest.mark.parametrize("inference", ["remote", "local"])
@pytest.mark.parametrize("form", ["pathmind", "space", "box"])
def test_run_env_explores_among_the_legal_jobs_only(scheduler: ModuleType, tmp_path: Path, form: str,
                                                    inference: str) -> None:
    """300 random steps of the scheduler (1,000 local Pathmind ones), which raises on
    an illegal job; the masks reach the server with the experience, in the observations or
    (``box``) beside them."""
    steps = DRAWS if (form, inference) == ("pathmind", "local") else FEWER
    app = local_app(dqn_schema(tmp_path, scheduler, form), tmp_path)
    env = priorities_only(scheduler) if form == "box" else scheduler.JobScheduler()
    with running_server(app) as url, PolicyClient(url, "1234567asdfgh", inference=inference, seed=0) as client:  # type: ignore[arg-type]
        client.register()
        assert client.epsilon == 1.0
        stats = run_env(client, env, max_steps=steps, seed=0)
        assert client.stats.samples_accepted == steps
    assert stats.steps == steps and stats.episodes == steps // 3


@pytest.mark.parametrize("inference, vector", [("remote", "sync"), ("local", "sync"), ("local", "async")])
def test_a_vector_env_asks_each_sub_environments_masks(scheduler: ModuleType, tmp_path: Path, inference: str,
                                                       vector: str) -> None:
    app = local_app(dqn_schema(tmp_path, scheduler, "box"), tmp_path)
    kind = gym.vector.SyncVectorEnv if vector == "sync" else gym.vector.AsyncVectorEnv
    envs = kind([lambda: priorities_only(scheduler)] * 4)
    with running_server(app) as url, PolicyClient(url, "1234567asdfgh", inference=inference, seed=0) as client:  # type: ignore[arg-type]
        client.register()
        stats = run_env(client, envs, max_steps=FEWER, seed=0)
        assert client.stats.samples_accepted == stats.steps >= FEWER


@pytest.mark.parametrize("inference", ["remote", "local"])
def test_act_sends_an_action_mask_and_explores_within_it(scheduler: ModuleType, tmp_path: Path, inference: str) -> None:
    app = local_app(dqn_schema(tmp_path, scheduler, "box"), tmp_path)
    env = scheduler.JobScheduler()
    with running_server(app) as url, PolicyClient(url, "1234567asdfgh", inference=inference, seed=0) as client:  # type: ignore[arg-type]
        assert client.epsilon is None  # never registered: the first DQN action reads the trainer's
        obs, _ = env.reset(seed=0)
        for step in range(FEWER):
            action, log_prob, _ = client.act(obs["priority"], action_mask=env.action_masks())
            assert log_prob == pytest.approx(-math.log(env.action_masks().sum())), step
            obs, _, terminated, _, _ = env.step(action)  # raises on an illegal job
            if terminated:
                obs, _ = env.reset()
        batch = [env.reset(seed=s)[0] for s in range(8)]
        masks = [np.array([True, False, False, False, False, True])] * 8
        assert {r.action for r in client.act_batch([o["priority"] for o in batch], masks)} <= {0, 5}
