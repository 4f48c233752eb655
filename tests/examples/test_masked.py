"""examples/masked: PPO learns the job scheduler through the server, with action masks; no illegal
action is ever answered. In-process (local backend), a fresh actor built as `copy_server_files` does."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import running_server
from fastapi.testclient import TestClient
from support import load_script

from policy_server.client import PolicyClient
from policy_server.gateway.app import build_app
from policy_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KEY = {"access-token": "1234567asdfgh"}


def load_example() -> ModuleType:
    return load_script(ROOT / "examples" / "masked" / "scheduler.py", "masked_scheduler")


def test_the_env_masks_illegal_jobs_and_refuses_them() -> None:
    scheduler = load_example()
    env = scheduler.JobScheduler()
    obs, _ = env.reset(seed=3)
    assert env.observation_space.contains(obs) and (env.action_masks() == obs["ready"]).all()
    legal = int(np.flatnonzero(obs["ready"])[0])
    obs, reward, *_ = env.step(legal)
    assert not obs["ready"][legal] and obs["priority"][legal] == 0.0 and reward > 0
    with pytest.raises(ValueError, match="not ready"):
        env.step(legal)


def test_ppo_learns_the_scheduler_through_the_server_with_masks(tmp_path: Path) -> None:
    scheduler = load_example()
    shutil.copy(ROOT / "examples" / "masked" / "schema.yaml", tmp_path / "schema.yaml")
    scheduler.build_models(tmp_path / "models")
    settings = Settings(schema_path=tmp_path / "schema.yaml", backend="local", gateway_metrics_port=0, seed=0)
    with TestClient(build_app(settings)) as client:
        result = scheduler.train(client, rounds=240, envs=16, headers=KEY)
    first, last = np.mean(result.returns[:150]), np.mean(result.returns[-150:])
    assert result.illegal == 0  # train() raises on the first illegal answer, too
    assert result.model_version >= 5
    assert last > first + 0.1, (first, last)


def test_local_inference_leaves_the_mask_field_out_of_the_model_input_and_masks_with_it(tmp_path: Path) -> None:
    """The client's local model reads the priorities only, as the server's does, and never picks a
    job that `ready` rules out (remote and local answers agree on every allowed set)."""
    scheduler = load_example()
    shutil.copy(ROOT / "examples" / "masked" / "schema.yaml", tmp_path / "schema.yaml")
    scheduler.build_models(tmp_path / "models")
    settings = Settings(schema_path=tmp_path / "schema.yaml", backend="local", gateway_metrics_port=0, seed=0)
    env = scheduler.JobScheduler()
    with running_server(build_app(settings)) as url, PolicyClient(url, KEY["access-token"], inference="local", seed=0) as local, \
            PolicyClient(url, KEY["access-token"], inference="remote", seed=0) as remote:
        obs, _ = env.reset(seed=1)
        for _ in range(40):
            body = {"priority": obs["priority"].tolist(), "ready": obs["ready"].astype(bool).tolist()}
            action, log_prob, _ = local.act(body)
            assert obs["ready"][action], (action, obs["ready"])
            answer = remote._post("/distribution", body)  # the server's masked distribution
            assert log_prob == pytest.approx(np.log(answer["probabilities"][str(action)]), abs=1e-5)
            obs, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                obs, _ = env.reset()
