"""The client's space logic (policy_server.client.spaces): the check against the server's policy,
the JSON form of observations, the model's input rows and the actions ``env.step`` takes."""

from __future__ import annotations

from typing import Any

import gymnasium.spaces as gs
import numpy as np
import pytest

from policy_server.client.spaces import SpaceMismatch, check_spaces, env_action, model_rows, space_json

CARTPOLE = gs.Box(np.array([-4.8, -np.inf, -0.41887903, -np.inf], np.float32),
                  np.array([4.8, np.inf, 0.41887903, np.inf], np.float32))
PATHMIND = {"name": "default", "obs_dim": 4, "observations": ["x", "x_dot", "theta", "theta_dot"],
            "observation_space": None, "action_space": {"type": "discrete", "n": 2, "names": ["left", "right"]}}
IMAGE = {"type": "box", "shape": [4, 84, 84], "dtype": "uint8"}
DICT = gs.Dict({"image": gs.Box(0, 255, (2, 2, 1), np.uint8), "gear": gs.Discrete(3),
                "buttons": gs.MultiBinary(2), "speed": gs.Box(-1.0, 1.0, (1,), np.float32)})


def served(observation_space: dict[str, Any] | None, action_space: dict[str, Any]) -> dict[str, Any]:
    return {"name": "pong", "obs_dim": 0, "observations": [], "observation_space": observation_space,
            "action_space": action_space}


def test_matching_spaces_pass() -> None:
    check_spaces(PATHMIND, CARTPOLE, gs.Discrete(2))
    check_spaces(served(IMAGE, {"type": "discrete", "n": 6}), gs.Box(0, 255, (4, 84, 84), np.uint8), gs.Discrete(6))
    check_spaces(served({"type": "discrete", "n": 16}, {"type": "multi_discrete", "nvec": [3, 2]}),
                 gs.Discrete(16), gs.MultiDiscrete([3, 2]))
    check_spaces(served({"type": "discrete", "n": 16}, {"type": "tuple", "nvec": [3, 2]}),
                 gs.Discrete(16), gs.MultiDiscrete([3, 2]))
    check_spaces(served({"type": "discrete", "n": 2}, {"type": "multi_binary", "n": 4}), gs.Discrete(2),
                 gs.MultiBinary([2, 2]))
    pendulum_action = gs.Box(-2.0, 2.0, (1,), np.float32)
    check_spaces(served({"type": "discrete", "n": 2}, {"type": "box", "shape": [1], "low": [-2.0], "high": [2.0]}),
                 gs.Discrete(2), pendulum_action)
    check_spaces(served({"type": "discrete", "n": 2}, {"type": "box", "shape": [1], "low": [None], "high": [None]}),
                 gs.Discrete(2), pendulum_action)  # an unbounded server's actions: the environment clips


@pytest.mark.parametrize(("described", "obs_space", "action_space", "says"), [
    (served(IMAGE, {"type": "discrete", "n": 6}), gs.Box(0, 255, (84, 84, 4), np.uint8), gs.Discrete(6),
     ("the environment's observation space {'type': 'box', 'shape': [84, 84, 4], 'dtype': 'uint8'} is not policy "
     "pong's observation_space {'type': 'box', 'shape': [4, 84, 84], 'dtype': 'uint8'}")),
    (served(IMAGE, {"type": "discrete", "n": 6}), gs.Box(0, 255, (4, 84, 84), np.uint8), gs.Discrete(4),
     "the environment's action space Discrete(4) is not policy pong's action_space {'type': 'discrete', 'n': 6}"),
    (PATHMIND, CARTPOLE, gs.Discrete(3), ("action space Discrete(3) is not policy default's action_space "
     "{'type': 'discrete', 'n': 2}")),
    (PATHMIND, gs.Box(-1.0, 1.0, (6,), np.float32), gs.Discrete(2),
     "flattens to 6 values, policy default takes 4 (observations ['x', 'x_dot', 'theta', 'theta_dot'])"),
    (PATHMIND, gs.Dict({"x": gs.Discrete(2)}), gs.Discrete(2), "observations have keys ['x'], policy default's"),
    (PATHMIND, gs.Discrete(4), gs.Discrete(2), ("observation space Discrete(4) is no Box, but policy default has "
     "Pathmind observations")),
    (served({"type": "discrete", "n": 2}, {"type": "box", "shape": [1], "low": [-1.0], "high": [1.0]}),
     gs.Discrete(2), gs.Box(-2.0, 2.0, (1,), np.float32), "action space Box(-2.0, 2.0, (1,), float32) is not"),
    (served({"type": "discrete", "n": 2}, {"type": "discrete", "n": 3}), gs.Discrete(2), gs.Discrete(3, start=1),
     "action space Discrete(3, start=1) is not"),
])
def test_a_mismatch_names_both_spaces(described: dict[str, Any], obs_space: gs.Space[Any],
                                      action_space: gs.Space[Any], says: str) -> None:
    with pytest.raises(SpaceMismatch) as refused:
        check_spaces(described, obs_space, action_space)
    assert says in str(refused.value)


def test_observations_in_the_json_form_of_their_space() -> None:
    obs = {"image": np.arange(4, dtype=np.uint8).reshape(2, 2, 1), "gear": np.int64(2),
           "buttons": np.array([1, 0], np.int8), "speed": np.array([0.5], np.float32)}
    assert space_json(DICT, obs) == {"buttons": [1, 0], "gear": 2, "image": [[[0], [1]], [[2], [3]]], "speed": [0.5]}
    blackjack = gs.Tuple([gs.Discrete(32), gs.Discrete(11), gs.Discrete(2)])
    assert space_json(blackjack, (np.int64(14), np.int64(10), np.int64(0))) == [14, 10, 0]
    assert space_json(gs.Discrete(16), np.int64(5)) == 5


def test_model_rows_follow_the_servers_model_input_rule() -> None:
    image = gs.Box(0, 255, (4, 8, 8), np.uint8)
    rows = model_rows(image, [image.sample(), image.sample(), image.sample()])
    assert rows.shape == (3, 4, 8, 8) and rows.dtype == np.uint8
    obs = DICT.sample()
    rows = model_rows(DICT, [obs])
    assert rows.dtype == np.float32 and rows.shape == (1, gs.flatdim(DICT))
    np.testing.assert_array_equal(rows[0], gs.flatten(DICT, obs).astype(np.float32))
    np.testing.assert_array_equal(model_rows(gs.Discrete(3), [2]), [[0.0, 0.0, 1.0]])


def test_actions_in_the_form_env_step_takes() -> None:
    assert env_action(gs.Discrete(3), 2) == 2
    bits = env_action(gs.MultiBinary([2, 2]), [1, 0, 0, 1])
    assert bits.shape == (2, 2) and bits.dtype == np.int8
    box = env_action(gs.Box(-2.0, 2.0, (1,), np.float32), [0.5])
    assert box.dtype == np.float32 and box.tolist() == [0.5]
    assert env_action(gs.MultiDiscrete([3, 2]), [2, 1]).tolist() == [2, 1]
