"""A small scheduling task with action masks, and a loop that trains it through the policy server.

``JobScheduler`` (a Gymnasium env): 6 jobs with random priorities in [0, 1); some are not ready at
the start, and a job, once scheduled, is never ready again. Each step schedules one ready job; the
reward is its priority times the step's weight (1.0, 0.7, 0.4): the best schedule takes the
highest-priority ready jobs first. An episode schedules 3 jobs. Illegal actions are common (a
third to two thirds of the jobs at any step); ``action_masks()`` gives the legal ones, as
sb3-contrib's ``MaskablePPO`` expects, and the observation carries them as ``ready``.

``build_models(out_dir, progress)`` writes a fresh actor (``generate.py copy_server_files``
calls it); ``train(client, ...)`` plays ``envs`` environments against a server whose schema is
``schema.yaml``: one ``/predict/batch`` per vector step (the masks in the observations), the
steps posted to ``/train/experience``; it raises if the server ever answers an illegal action.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from policy_server.export import MLPPolicy, export_module

JOBS = 6
WEIGHTS = (1.0, 0.7, 0.4)


class JobScheduler(gym.Env[dict[str, np.ndarray], int]):
    """Schedule ``len(WEIGHTS)`` of ``JOBS`` jobs, highest priority first; masked when not ready."""

    observation_space = gym.spaces.Dict({
        "priority": gym.spaces.Box(0.0, 1.0, (JOBS,), np.float32),
        "ready": gym.spaces.MultiBinary(JOBS),
    })
    action_space = gym.spaces.Discrete(JOBS)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict]:
        super().reset(seed=seed)
        self.priority = self.np_random.uniform(0.0, 1.0, JOBS).astype(np.float32)
        self.ready = np.ones(JOBS, dtype=bool)
        self.ready[self.np_random.choice(JOBS, size=int(self.np_random.integers(0, 3)), replace=False)] = False
        self.t = 0
        return self._obs(), {}

    def action_masks(self) -> np.ndarray:
        return self.ready.copy()

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        if not self.ready[action]:
            raise ValueError(f"job {action} is not ready: an illegal action")
        reward = float(self.priority[action]) * WEIGHTS[self.t]
        self.ready[action] = False
        self.t += 1
        return self._obs(), reward, self.t == len(WEIGHTS), False, {}

    def _obs(self) -> dict[str, np.ndarray]:
        # a job that cannot be scheduled shows priority 0: the model sees what is left to gain
        return {"priority": np.where(self.ready, self.priority, 0.0).astype(np.float32), "ready": self.ready.copy()}


def wire(obs: dict[str, np.ndarray]) -> dict[str, Any]:
    """An observation as the schema's JSON object (``ready`` is the action mask, no model input)."""
    return {"priority": obs["priority"].tolist(), "ready": obs["ready"].tolist()}


def build_models(out_dir: Path, progress: Callable[[str, int, int], None] | None = None, seed: int = 0) -> Path:
    """A fresh actor (6 priorities in, 6 logits out) as ``out_dir/scheduler.pt2``."""
    torch.manual_seed(seed)
    path = export_module(MLPPolicy(JOBS, [32], nvec=[JOBS]), JOBS, Path(out_dir) / "scheduler.pt2")
    if progress is not None:
        progress("building the masked example's actor", 1, 1)
    return path


@dataclass
class Result:
    returns: list[float] = field(default_factory=list)
    """Every finished episode's return, in order."""
    illegal: int = 0
    """Illegal actions the server answered (the env refuses them; always 0)."""
    model_version: int = 0


def train(client: Any, rounds: int, envs: int = 16, seed: int = 0, headers: dict[str, str] | None = None,
          prefix: str = "") -> Result:
    """``rounds`` vector steps of ``envs`` schedulers against ``client`` (an httpx-like client of a
    server with this example's schema), posting each round's steps to ``/train/experience``."""
    games = [JobScheduler() for _ in range(envs)]
    obs = [g.reset(seed=seed + i)[0] for i, g in enumerate(games)]
    running, result = [0.0] * envs, Result()
    for r in range(rounds):
        answer = client.post(f"{prefix}/predict/batch", json={"observations": [wire(o) for o in obs]}, headers=headers)
        answer.raise_for_status()
        body = answer.json()
        steps = []
        for i, (game, acted) in enumerate(zip(games, body["results"])):
            if not obs[i]["ready"][acted["action"]]:
                result.illegal += 1
                raise AssertionError(f"the server answered job {acted['action']}, which is not ready")
            next_obs, reward, terminated, _, _ = game.step(acted["action"])
            running[i] += reward
            steps.append({"obs": wire(obs[i]), "action": acted["action"], "reward": reward, "next_obs": wire(next_obs),
                          "terminated": terminated, "log_prob": acted["log_prob"], "model_version": body["model_version"]})
            if terminated:
                result.returns.append(running[i])
                running[i] = 0.0
                next_obs = game.reset(seed=seed + envs * (r + 1) + i)[0]
            obs[i] = next_obs
        client.post(f"{prefix}/train/experience", json={"client_id": "scheduler", "steps": steps},
                    headers=headers).raise_for_status()
        result.model_version = body["model_version"]
    return result
