"""``run_env``: a Gymnasium environment played with a PolicyClient against a real server that trains."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
from client_support import trainable_server
from conftest import API_KEY

from policy_server.client import EnvStats, PolicyClient, run_env


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
