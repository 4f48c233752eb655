"""The shipped example policies are trained (not random) and their schemas serve them.

* cartpole: the exported TorchScript model balances the pole in CartPole-v1 (greedy actions).
* lpoc: the exported model reaches its goal far more often than random policies do.
* all example schemas (and the top-level bundled one) load and resolve against their models,
  and an observation sent in the schema's field order reaches the model as the env builds it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import gymnasium as gym
import numpy as np
import pytest

from policy_server.policies.served import resolve_policy
from policy_server.policies.torch_policy import TorchPolicy
from policy_server.schema.config import load_schema
from policy_server.schema.observations import flatten

ROOT = Path(__file__).resolve().parents[2]
CARTPOLE_MODEL = ROOT / "examples" / "cartpole" / "models" / "cartpole.pt"
LPOC_MODEL = ROOT / "examples" / "lpoc" / "models" / "lpoc.pt"
LPOC_FIELDS = [
    "id", "coordinates_0", "coordinates_1",
    "has_up_neighbour", "is_up_free", "has_right_neighbour", "is_right_free",
    "has_down_neighbour", "is_down_free", "has_left_neighbour", "is_left_free",
]  # fmt: skip


@pytest.fixture(scope="module")
def lpoc() -> ModuleType:
    """examples/lpoc/train_policy.py as a module (it defines the grid world)."""
    name = "lpoc_train_policy"
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "lpoc" / "train_policy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def greedy(policy: TorchPolicy, obs: np.ndarray) -> int:
    return int(policy.forward(obs[None]).heads[0][0].argmax())


def test_cartpole_model_balances_the_pole() -> None:
    policy = TorchPolicy.from_file(CARTPOLE_MODEL)
    env = gym.make("CartPole-v1")
    returns = []
    for seed in range(5):
        obs, _ = env.reset(seed=seed)
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(greedy(policy, obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    assert np.mean(returns) >= 475, returns


def test_lpoc_model_beats_random_policies(lpoc: ModuleType) -> None:
    policy = TorchPolicy.from_file(LPOC_MODEL)
    episodes, seed = 300, 123_456  # seeds the training episodes (from 10**6 on) never used
    rng = np.random.default_rng(0)
    trained = lpoc.evaluate(lambda env, obs: greedy(policy, obs), episodes, seed)
    uniform = lpoc.evaluate(lpoc.random_policy(rng), episodes, seed)
    free_moves = lpoc.evaluate(lpoc.random_free_policy(rng), episodes, seed)
    expert = lpoc.evaluate(lpoc.expert_policy, episodes, seed)

    assert expert["success"] == 1.0  # every drawn map is solvable
    assert uniform["success"] < 0.1 and uniform["collision"] > 0.8
    assert trained["collision"] <= 0.02  # it has learnt not to step into occupied cells
    assert trained["success"] >= 0.55
    assert trained["success"] >= free_moves["success"] + 0.3, (trained, free_moves)


def test_lpoc_env_observation_layout(lpoc: ModuleType) -> None:
    assert list(lpoc.OBSERVATIONS) == LPOC_FIELDS
    env = lpoc.GridWorld()
    obs = env.reset(7)
    x, y = env.pos
    assert obs.shape == (11,) and obs[0] == env.id and (obs[1], obs[2]) == (x, y)
    for i, (dx, dy) in enumerate(lpoc.MOVES):
        on_grid = 0 <= x + dx < env.size and 0 <= y + dy < env.size
        assert obs[3 + 2 * i] == on_grid
        assert obs[4 + 2 * i] == (on_grid and not env.blocked[x + dx, y + dy])


@pytest.mark.parametrize(
    ("schema", "obs_dim", "names"),
    [
        ("examples/cartpole/schema.yaml", 4, ["left", "right"]),
        ("examples/lpoc/schema.yaml", 11, ["up", "right", "down", "left"]),
        ("schema.yaml", 11, ["up", "right", "down", "left"]),
    ],
)
def test_example_schemas_resolve(schema: str, obs_dim: int, names: list[str]) -> None:
    loaded = load_schema(ROOT / schema)
    assert loaded.api_key is not None and loaded.api_key.get_secret_value() == "1234567asdfgh"
    served, policy = resolve_policy(loaded.policies[loaded.default_policy])
    described = served.describe()
    assert described["obs_dim"] == obs_dim
    assert described["action_space"] == {"type": "discrete", "n": len(names), "names": names}
    assert policy.forward(np.zeros((3, obs_dim), dtype=np.float32)).heads[0].shape == (3, len(names))
    if obs_dim == 11:
        assert served.field_names == LPOC_FIELDS


def test_top_level_schema_is_the_lpoc_example() -> None:
    assert (ROOT / "schema.yaml").read_text() == (ROOT / "examples/lpoc/schema.yaml").read_text()
    assert (ROOT / "models/lpoc.pt").read_bytes() == LPOC_MODEL.read_bytes()


def test_served_lpoc_observation_matches_env(lpoc: ModuleType) -> None:
    """A request body in schema order, validated and flattened as the gateway does, is the env's vector."""
    loaded = load_schema(ROOT / "schema.yaml")
    served, policy = resolve_policy(loaded.policies[loaded.default_policy])
    assert served.observation_model is not None
    env = lpoc.GridWorld()
    for seed in range(20):
        obs = env.reset(seed)
        body = {
            name: (int(v) if served.spec.observations[name].type == "int" else bool(v))
            for name, v in zip(served.field_names, obs)
        }
        row = flatten([served.observation_model.model_validate(body)], exclude=served.mask_attribute)
        np.testing.assert_array_equal(row[0], obs)
        assert greedy(policy, row[0]) == greedy(TorchPolicy.from_file(LPOC_MODEL), obs)
