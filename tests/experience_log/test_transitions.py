"""A log as the trainers' experience: DQN's replay buffer starts with the logged transitions."""

from __future__ import annotations

from pathlib import Path

import gymnasium.spaces as gs
import numpy as np
import pytest
import torch
from minari.serialization import serialize_space

from policy_server.experience_log.join import Episode
from policy_server.experience_log.records import Asker, Decisions, Outcomes
from policy_server.experience_log.transitions import logged_batch, to_batch
from policy_server.experience_log.writer import ExperienceLog
from policy_server.export import MLPPolicy
from policy_server.policies.spaces import ActionSample, DiscreteSpace
from policy_server.schema.experience_log import ExperienceLogSpec
from policy_server.schema.training import DQNConfig, TrainingSpec
from policy_server.training.learners import make_learner


def episode(obs: list[float], ended: bool) -> Episode:
    t = len(obs) - 1
    return Episode("s", np.array(obs, dtype=np.float32)[:, None], np.arange(t, dtype=np.float64)[:, None] % 2,
                   np.ones(t), np.full(t, -0.7), np.zeros(t, dtype=np.int64), ("r",) * t, ended, False)


def test_runs_become_fragments_that_end_or_bootstrap() -> None:
    batch = to_batch([episode([0, 1, 2], True), episode([5, 6], False)], np.int64)
    assert batch.obs[:, 0].tolist() == [0, 1, 5] and batch.next_obs[:, 0].tolist() == [1, 2, 6]
    assert batch.terminated.tolist() == [False, True, False] and batch.segment_end.tolist() == [False, True, True]
    assert batch.actions.dtype == np.int64 and batch.actions[:, 0].tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="no step"):
        to_batch([episode([3], False)], np.int64)


def write_log(folder: Path, steps: int) -> np.ndarray:
    doc = {"policy": "cart", "observation_space": serialize_space(gs.Box(-np.inf, np.inf, (4,)), to_string=False),
           "action_space": serialize_space(gs.Discrete(2), to_string=False),
           "model_input": {"shape": [4], "dtype": "<f4"}}
    rows = np.random.default_rng(1).normal(size=(steps + 1, 4)).astype(np.float32)
    log = ExperienceLog(ExperienceLogSpec(path=folder, flush_s=0.01), "cart", doc)
    log.open()
    for t in range(steps):
        log.submit(Decisions(2 * t, "cart", Asker(f"r{t}", "/predict", "e"), rows[t][None],
                             [ActionSample(t % 2, -0.7, 0.5)], 0, "stable"))
        log.submit(Outcomes(2 * t + 1, "cart", Asker("o", "/train/experience"), [f"r{t}"], [float(t)],
                            [t == steps - 1], [False], rows[t + 1][None]))
    log.close()
    return rows


def test_dqn_starts_with_the_logs_transitions(tmp_path: Path) -> None:
    rows = write_log(tmp_path / "log", steps=40)
    spec = TrainingSpec(algorithm="dqn", dqn=DQNConfig(buffer_size=100), from_log=tmp_path / "log")
    learner = make_learner(MLPPolicy(4, [8], nvec=[2]), 4, DiscreteSpace(2), spec, policy="another-name")
    stored = learner.buffer.state_dict()  # type: ignore[attr-defined]
    assert torch.equal(stored["obs"], torch.from_numpy(rows[:-1])) and torch.equal(stored["next_obs"], torch.from_numpy(rows[1:]))
    assert stored["rewards"].tolist() == list(range(40)) and stored["actions"][:, 0].tolist() == [t % 2 for t in range(40)]
    assert stored["terminated"].tolist() == [False] * 39 + [True]
    assert learner.samples == 0  # learning_starts still counts transitions received


def test_a_log_of_another_width_is_refused_naming_both(tmp_path: Path) -> None:
    write_log(tmp_path / "log", steps=3)
    with pytest.raises(ValueError, match=r"training.from_log: .* shape \[4\]; this policy's model takes \[6\]"):
        logged_batch(tmp_path / "log", "cart", (6,), np.int64)
    with pytest.raises(ValueError, match="no experience log folder"):
        logged_batch(tmp_path / "nothing", "cart", (4,), np.int64)
