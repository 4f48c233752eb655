"""The environment loop: ``run_env`` plays a Gymnasium environment with a ``PolicyClient``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policy_server.client.acting import ActionValue
from policy_server.client.experience import PolicyClient


@dataclass
class EnvStats:
    """What ``run_env`` played."""

    steps: int = 0
    episodes: int = 0
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    wall_s: float = 0.0

    def mean_return(self, last: int | None = None) -> float | None:
        window = self.returns[-last:] if last else self.returns
        return float(np.mean(window)) if window else None


def run_env(
    client: PolicyClient,
    env: Any,
    max_steps: int | None = None,
    max_episodes: int | None = None,
    stop: Callable[[], bool] | None = None,
    seed: int | None = None,
    on_episode: Callable[[EnvStats], None] | None = None,
    train: bool = True,
) -> EnvStats:
    """Play a Gymnasium environment with the client's policy, sending the experience.

    Runs until ``max_steps`` steps, ``max_episodes`` episodes, or ``stop()`` is true (checked
    every step), whichever comes first; then flushes. ``seed`` seeds the first ``reset``;
    ``on_episode`` is called with the stats after each episode. ``train=False`` only acts.
    """
    stats, start = EnvStats(), time.monotonic()
    obs, _ = env.reset(seed=seed)
    ep_return, ep_len = 0.0, 0
    while not (
        (max_steps is not None and stats.steps >= max_steps)
        or (max_episodes is not None and stats.episodes >= max_episodes)
        or (stop is not None and stop())
    ):
        action, log_prob, version = client.act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(_env_action(action))
        if train:
            client.log_step(obs, action, float(reward), terminated, truncated, next_obs, log_prob, version)
        stats.steps += 1
        ep_return, ep_len = ep_return + float(reward), ep_len + 1
        if terminated or truncated:
            stats.episodes += 1
            stats.returns.append(ep_return)
            stats.lengths.append(ep_len)
            ep_return, ep_len = 0.0, 0
            if on_episode is not None:
                on_episode(stats)
            obs, _ = env.reset()
        else:
            obs = next_obs
    if train:
        client.flush()
    stats.wall_s = time.monotonic() - start
    return stats


def _env_action(action: ActionValue) -> Any:
    """A list action as the numpy array Gymnasium's MultiDiscrete and Box spaces take."""
    return np.asarray(action) if isinstance(action, list) else action
