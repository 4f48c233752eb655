"""Schemas from Gymnasium environments (policy_server.envs, ``generate.py schema --env``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import gymnasium.spaces as gs
import numpy as np
import pytest
import torch
import yaml

from policy_server import cli
from policy_server.envs import action_space_entry, env_schema, make_env
from policy_server.errors import SchemaError
from policy_server.export import MLPPolicy, export_module
from policy_server.schema.config import load_schema
from policy_server.schema.gym_spaces import parse_space

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("generate", ROOT / "generate.py")
assert _spec is not None and _spec.loader is not None
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)
DICT_ENV = "PolicyServerTest/DictObs-v0"


class DictObsEnv(gym.Env[dict[str, Any], int]):
    """A Dict observation (an image, a speed, a gear) and three discrete actions."""

    observation_space = gs.Dict({
        "image": gs.Box(0, 255, (8, 8, 3), np.uint8),
        "speed": gs.Box(-1.0, 1.0, (1,), np.float32),
        "gear": gs.Discrete(5),
    })
    action_space = gs.Discrete(3)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: int) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        return self.observation_space.sample(), 1.0, False, False, {}


class TextObsEnv(DictObsEnv):
    observation_space = gs.Text(8)  # type: ignore[assignment]


gym.register(DICT_ENV, entry_point=DictObsEnv)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "FrozenLake-v1", DICT_ENV, "ALE/Pong-v5"])
def test_the_written_schema_loads_and_its_spaces_are_the_environments(env_id: str, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "policy.pt2").touch()  # load_schema checks the file is there; `check` loads one below
    message = cli.schema(env_id, out=str(tmp_path / "schema.yaml"), model=str(tmp_path / "models" / "policy.pt2"))
    assert message.startswith(f"wrote {tmp_path / 'schema.yaml'} for {env_id}")
    written = yaml.safe_load((tmp_path / "schema.yaml").read_text())
    env = make_env(env_id)
    assert parse_space(written["observation_space"], "observation_space") == env.observation_space
    assert written["parameters"] == {"action_space": action_space_entry(env.action_space), "model": "models/policy.pt2"}
    loaded = load_schema(tmp_path / "schema.yaml").policies["default"]
    assert loaded.model == (tmp_path / "models" / "policy.pt2").resolve()
    assert loaded.action_space.type == written["parameters"]["action_space"]["type"]
    env.close()


def test_a_cartpole_schema_with_its_model_passes_the_servers_check(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = export_module(MLPPolicy(4, [8], nvec=[2]), 4, tmp_path / "models" / "cartpole.pt2")
    cli.schema("CartPole-v1", out=str(tmp_path / "schema.yaml"), model=str(model))
    checked = cli.check(str(tmp_path / "schema.yaml"))["policies"]["default"]
    assert checked["obs_dim"] == 4 and checked["action_space"]["n"] == 2


def test_action_spaces_in_the_schemas_form() -> None:
    assert action_space_entry(gs.Discrete(4)) == {"type": "discrete", "n": 4}
    assert action_space_entry(gs.MultiDiscrete([3, 2])) == {"type": "multi_discrete", "nvec": [3, 2]}
    assert action_space_entry(gs.MultiBinary(6)) == {"type": "multi_binary", "n": 6}
    assert action_space_entry(gs.Box(-1.0, 1.0, (2,))) == {"type": "box", "shape": [2], "low": -1.0, "high": 1.0}
    assert action_space_entry(gs.Box(np.array([-1.0, 0.0], np.float32), np.array([1.0, 5.0], np.float32))) == {
        "type": "box", "shape": [2], "low": [-1.0, 0.0], "high": [1.0, 5.0]}
    assert action_space_entry(gs.Box(-np.inf, np.inf, (3,))) == {"type": "box", "shape": [3]}


@pytest.mark.parametrize(("space", "says"), [
    (gs.Discrete(3, start=1), "starts at 1, but the server's actions count from 0"),
    (gs.Text(5), "action space Text cannot be served; the server serves Discrete, MultiDiscrete, MultiBinary, Box"),
    (gs.Tuple([gs.Discrete(2), gs.Box(0, 1)]), "action space Tuple cannot be served"),
])
def test_action_spaces_the_server_cannot_serve_are_refused(space: gs.Space[Any], says: str) -> None:
    with pytest.raises(SchemaError, match=says.replace("(", r"\(").replace(")", r"\)")):
        action_space_entry(space)


def test_an_observation_space_the_server_cannot_serve_is_refused_in_one_line() -> None:
    with pytest.raises(SchemaError) as refused:
        env_schema(TextObsEnv())
    assert refused.value.message.startswith("observation space Text(") and "no schema form" in refused.value.message
    assert "\n" not in refused.value.message


def test_environments_by_entry_point_and_by_module_and_id() -> None:
    by_class = make_env("gymnasium.envs.classic_control.cartpole:CartPoleEnv", {"render_mode": None})
    by_module_id = make_env("gymnasium.envs.classic_control:CartPole-v1")
    assert by_class.observation_space == by_module_id.observation_space
    with pytest.raises(SchemaError, match="--env gymnasium.envs.classic_control:NoSuchEnv: .* has no 'NoSuchEnv'"):
        make_env("gymnasium.envs.classic_control:NoSuchEnv")
    with pytest.raises(SchemaError, match="--env NoSuchEnv-v0: cannot make the environment: NameNotFound"):
        make_env("NoSuchEnv-v0")


def test_the_command_refuses_an_unservable_space_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "graph_env.py").write_text(
        "import gymnasium as gym\n"
        "class GraphEnv(gym.Env):\n"
        "    observation_space = gym.spaces.Graph(gym.spaces.Box(0, 1, (2,)), None)\n"
        "    action_space = gym.spaces.Discrete(2)\n"
    )
    monkeypatch.setattr(sys, "argv", ["generate.py", "schema", "--env", f"{tmp_path / 'graph_env.py'}:GraphEnv",
                                      "--out", str(tmp_path / "schema.yaml")])
    with pytest.raises(SystemExit) as exited:
        generate.main()
    message = str(exited.value.code)  # what Python prints to stderr, exit status 1
    assert message.startswith("policy-server: observation space Graph(") and "\n" not in message
    assert "Graph spaces have no schema form" in message and not (tmp_path / "schema.yaml").exists()


def test_env_kwargs_make_the_environment_and_text_is_refused(tmp_path: Path) -> None:
    cli.schema("FrozenLake-v1", out=str(tmp_path / "schema.yaml"), env_kwargs={"map_name": "8x8"})
    assert yaml.safe_load((tmp_path / "schema.yaml").read_text())["observation_space"] == {"type": "discrete", "n": 64}
    with pytest.raises(SchemaError, match="--env_kwargs: a mapping such as"):
        cli.schema("FrozenLake-v1", out=str(tmp_path / "other.yaml"), env_kwargs="{map_name: 8x8}")  # type: ignore[arg-type]


def test_an_existing_schema_is_kept_unless_forced(tmp_path: Path) -> None:
    target = tmp_path / "schema.yaml"
    target.write_text("# the user's own\n")
    with pytest.raises(SchemaError, match=r"schema.yaml exists: pass --out <another file>, or --force"):
        cli.schema("CartPole-v1", out=str(target))
    assert target.read_text() == "# the user's own\n"
    cli.schema("CartPole-v1", out=str(target), force=True)
    assert yaml.safe_load(target.read_text())["observation_space"]["type"] == "box"
