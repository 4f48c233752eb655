"""``PolicyClient``'s experience and training calls against a real server that trains (uvicorn in
front of the local backend): fragments of consecutive steps, and the 409 answers of training."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import httpx
import pytest
from client_support import AUTH, cartpole_schema, local_app, steps_of, trainable_server
from conftest import API_KEY, running_server
from support import wait_until

from policy_server.client import PolicyClient, PolicyClientError, run_env


@pytest.fixture()
def trainable(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A CartPole policy that the server trains with PPO (64 samples per update)."""
    with trainable_server(tmp_path) as server:
        yield server


def test_experience_is_posted_in_fragments_of_consecutive_steps(trainable: tuple[str, Any]) -> None:
    url, _ = trainable
    env = gym.make("CartPole-v1")
    with PolicyClient(url, API_KEY, inference="remote", fragment_steps=16, client_id="frag-1") as client:
        stats = run_env(client, env, max_steps=40, seed=0)
        status = client.status()
    env.close()
    assert stats.steps == 40 and client.stats.posts == 3  # 16 + 16 + the final flush of 8
    assert client.stats.samples_accepted == 40 and client.pending_steps == 0
    assert status["samples_received"] == 40 and status["clients"]["frag-1"]["samples"] == 40
    # the server found the episode ends where the client did: the fragments' flags were right
    assert status["episodes"] == stats.episodes >= 1
    assert status["recent_returns"] == pytest.approx(stats.returns)


def test_stale_experience_is_dropped_and_the_weights_refreshed(trainable: tuple[str, Any]) -> None:
    url, _ = trainable
    env = gym.make("CartPole-v1")
    with PolicyClient(url, API_KEY, inference="local", fragment_steps=64) as client:
        run_env(client, env, stop=lambda: (client.server_version or 0) >= 2, seed=0)
        wait_until(lambda: client.version() >= 2, 60, message="the server did not reach version 2")
        # on a loaded machine the server can train twice between two of run_env's refreshes, so
        # run_env's own posts may already have been stale: count from here
        stale, dropped = client.stats.stale_posts, client.stats.dropped_steps
        steps_of(env, client, 10, seed=5, version=0)  # acted by version 0: older than 1 behind
        assert client.flush() is None
        assert client.stats.stale_posts == stale + 1 and client.stats.dropped_steps == dropped + 10
        assert client.local_version == client.version()
    env.close()


def test_experience_waits_while_training_is_paused(trainable: tuple[str, Any]) -> None:
    url, _ = trainable
    env = gym.make("CartPole-v1")
    with PolicyClient(url, API_KEY, inference="remote", wait_for_training_s=0.3) as client:
        client.act([0.0] * 4)
        assert client.pause()["state"] == "paused"
        steps_of(env, client, 5, seed=0)
        with pytest.raises(PolicyClientError) as caught:
            client.flush()
        assert caught.value.status == 409 and caught.value.code == "training_not_running"
        assert client.stats.not_running_waits == 1 and client.stats.dropped_steps == 5

        client.wait_for_training_s = 30
        threading.Timer(0.5, lambda: httpx.post(f"{url}/train/start", headers=AUTH)).start()
        steps_of(env, client, 5, seed=1)
        start = time.monotonic()
        assert client.flush() is None  # dropped, then waited until training ran again
        assert time.monotonic() - start >= 0.4 and client.training_state == "running"
        assert client.stats.not_running_waits == 2 and client.stats.dropped_steps == 10
        steps_of(env, client, 5, seed=2)
        assert client.flush()["accepted"] == 5
    env.close()


def test_acting_on_the_server_keeps_an_episode_on_one_version_and_reports_it(tmp_path: Path) -> None:
    """A policy with a candidate (`canary`, share 0.5): the client sends each fragment's `variant`,
    asks the rest of an episode of the version that acted its first step, and the server counts
    each episode's return for that version."""
    schema = cartpole_schema(tmp_path)
    schema["parameters"]["canary"] = {"model": schema["parameters"]["model"], "share": 0.5}
    env = gym.make("CartPole-v1")
    with running_server(local_app(schema, tmp_path)) as url, \
            PolicyClient(url, API_KEY, inference="remote", client_id="canary-1") as client:
        episodes: list[set[str]] = []
        for episode in range(12):
            obs, _ = env.reset(seed=episode)
            acted: set[str] = set()
            for t in range(5):
                action, log_prob, version = client.act(obs)
                acted.add(client.last_variant)
                next_obs, _, _, _, _ = env.step(action)
                client.log_step(obs, action, 1.0, False, t == 4, next_obs, log_prob, version)
                obs = next_obs
            episodes.append(acted)
        client.flush()
        versions = httpx.get(f"{url}/versions", headers=AUTH).json()
    env.close()
    assert all(len(acted) == 1 for acted in episodes)
    assert {v for acted in episodes for v in acted} == {"stable", "canary"}  # the server is seeded: no chance
    counted = {v: versions[v]["episodes"] for v in ("stable", "canary")}
    assert counted == {v: sum(acted == {v} for acted in episodes) for v in ("stable", "canary")}
    assert {versions[v]["mean_episode_return"] for v in counted} == {5.0}


def test_action_masks_travel_with_the_experience(trainable: tuple[str, Any]) -> None:
    url, _ = trainable
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=0)
    masks = [[True, True], [True, True], [True, False], [True, True]]  # as an env's action_masks() gives them
    with PolicyClient(url, API_KEY, inference="remote", fragment_steps=100, client_id="masked-1") as client:
        for t in range(3):
            action = client.act(obs, action_mask=masks[t]).action  # a masked action would be refused (422)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            client.log_step(obs, action, float(reward), terminated, truncated, next_obs,
                            action_mask=masks[t], next_action_mask=masks[t + 1])
            obs = next_obs
        fragment = client._open[0].wire()
        assert fragment["action_masks"] == masks
        client.flush()
        assert client.stats.samples_accepted == 3 and client.stats.posts == 1
    env.close()
