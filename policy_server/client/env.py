"""The environment loop: ``run_env`` plays a Gymnasium environment, or a Gymnasium vector
environment, with a ``PolicyClient``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import iterate

from policy_server.client.experience import PolicyClient
from policy_server.client.spaces import check_spaces, env_action


@dataclass
class EnvStats:
    """What ``run_env`` played (over every sub-environment of a vector environment)."""

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
    env: gym.Env[Any, Any] | VectorEnv[Any, Any, Any],
    max_steps: int | None = None,
    max_episodes: int | None = None,
    stop: Callable[[], bool] | None = None,
    seed: int | None = None,
    on_episode: Callable[[EnvStats], None] | None = None,
    train: bool = True,
) -> EnvStats:
    """Play a Gymnasium environment with the client's policy, sending the experience.

    First checks the environment's spaces against the server's policy (``spaces.check_spaces``:
    raises ``SpaceMismatch`` naming both). A vector environment (``gymnasium.vector.SyncVectorEnv``,
    ``AsyncVectorEnv``, ``gym.make_vec``) asks for all its sub-environments' actions in one batch
    request per vector step and logs each sub-environment's steps as its own episodes; its
    autoreset mode is honoured (``NEXT_STEP``, the default: the step after an episode's end is a
    reset step, not logged; ``SAME_STEP``: the episode's last observation is ``info["final_obs"]``;
    ``DISABLED``: ended sub-environments are reset with ``reset_mask``). ``steps`` counts
    sub-environment steps.

    Action masks: an environment with sb3-contrib's ``action_masks()`` (reached through wrappers;
    ``call("action_masks")`` for a vector environment) against a policy whose observations hold no
    mask has its masks sent with each action request (``action_mask``) and with the experience
    (``action_mask`` / ``next_action_mask`` of each step); no action is ever a masked one, a DQN's
    random ones included.

    Runs until ``max_steps`` steps, ``max_episodes`` episodes, or ``stop()`` is true (checked
    every step; a vector step may pass ``max_steps`` by fewer than ``num_envs``), whichever comes
    first; then flushes. ``seed`` seeds the first ``reset``; ``on_episode`` is called with the stats
    after each episode. ``train=False`` only acts; ``train=True`` against a policy without a
    ``training`` section raises ValueError before the first step (its experience has nowhere to go).
    """
    vector = isinstance(env, VectorEnv)
    observation_space = env.single_observation_space if vector else env.observation_space
    action_space = env.single_action_space if vector else env.action_space
    described = client.describe()
    check_spaces(described, observation_space, action_space)
    if train and described.get("training") is None:
        raise ValueError(f"policy {described['name']!r} has no `training` section, so the server takes no "
                         "experience from it: pass train=False to only act")
    stats, start = EnvStats(), time.monotonic()

    def done() -> bool:
        return ((max_steps is not None and stats.steps >= max_steps)
                or (max_episodes is not None and stats.episodes >= max_episodes)
                or (stop is not None and stop()))

    if vector:
        _play_vector(client, env, stats, done, seed, on_episode, train, described)
    else:
        _play(client, env, stats, done, seed, on_episode, train, described)
    if train:
        client.flush()
    stats.wall_s = time.monotonic() - start
    return stats


Legal = Callable[[], Any] | None
"""The environment's ``action_masks()`` (a vector environment's: one per sub-environment), or None."""


def _legal_actions(env: gym.Env[Any, Any] | VectorEnv[Any, Any, Any], described: dict[str, Any], vector: bool) -> Legal:
    """The environment's masks (sb3-contrib's ``action_masks()``) when the policy's observations
    hold none (no ``action_space.mask``) and its actions are discrete; None otherwise."""
    if described.get("mask") or described["action_space"]["type"] not in ("discrete", "tuple", "multi_discrete"):
        return None
    if vector:  # of each sub-environment (a vector wrapper has no `call`: the vector env's own)
        call = env.unwrapped.call  # type: ignore[attr-defined]
        # asked first: a missing attribute would stop an async vector env's worker
        if not all(call("has_wrapper_attr", "action_masks")):
            return None
        return lambda: call("action_masks")
    if not env.has_wrapper_attr("action_masks"):  # type: ignore[union-attr]
        return None
    masks = env.get_wrapper_attr("action_masks")  # type: ignore[union-attr]
    return masks if callable(masks) else None


def _end_episode(stats: EnvStats, ep_return: float, ep_len: int, on_episode: Callable[[EnvStats], None] | None) -> None:
    stats.episodes += 1
    stats.returns.append(ep_return)
    stats.lengths.append(ep_len)
    if on_episode is not None:
        on_episode(stats)


def _play(
    client: PolicyClient, env: gym.Env[Any, Any], stats: EnvStats, done: Callable[[], bool], seed: int | None,
    on_episode: Callable[[EnvStats], None] | None, train: bool, described: dict[str, Any],
) -> None:
    obs, _ = env.reset(seed=seed)
    legal = _legal_actions(env, described, vector=False)
    mask = legal() if legal else None
    ep_return, ep_len = 0.0, 0
    while not done():
        action, log_prob, version = client.act(obs, action_mask=mask)
        next_obs, reward, terminated, truncated, _ = env.step(env_action(env.action_space, action))
        next_mask = legal() if legal else None
        if train:
            client.log_step(obs, action, float(reward), terminated, truncated, next_obs, log_prob, version,
                            action_mask=mask, next_action_mask=next_mask)
        stats.steps += 1
        ep_return, ep_len = ep_return + float(reward), ep_len + 1
        if terminated or truncated:
            _end_episode(stats, ep_return, ep_len, on_episode)
            ep_return, ep_len = 0.0, 0
            obs, _ = env.reset()
            mask = legal() if legal else None
        else:
            obs, mask = next_obs, next_mask


def _play_vector(
    client: PolicyClient, env: VectorEnv[Any, Any, Any], stats: EnvStats, done: Callable[[], bool],
    seed: int | None, on_episode: Callable[[EnvStats], None] | None, train: bool, described: dict[str, Any],
) -> None:
    """One batch request per vector step for the sub-environments that step (a sub-environment
    resetting under ``NEXT_STEP`` ignores its action: it is not asked for one, nor logged)."""
    mode = AutoresetMode(env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP))
    n = env.num_envs
    batch, _ = env.reset(seed=seed)
    observations = list(iterate(env.observation_space, batch))
    legal = _legal_actions(env, described, vector=True)
    masks = legal() if legal else None
    resetting = np.zeros(n, dtype=bool)  # NEXT_STEP: this step of the sub-environment is its reset
    actions = [env.single_action_space.sample() for _ in range(n)]  # what a resetting one is handed
    ep_return, ep_len = np.zeros(n), np.zeros(n, dtype=int)
    while not done():
        acting = [i for i in range(n) if not resetting[i]]
        asked = None if masks is None else [masks[i] for i in acting]
        results = dict(zip(acting, client.act_batch([observations[i] for i in acting], asked), strict=True))
        for i, result in results.items():
            actions[i] = env_action(env.single_action_space, result.action)
        batch, rewards, terminated, truncated, info = env.step(_batched(env, actions))
        next_observations = list(iterate(env.observation_space, batch))
        ended = np.logical_or(terminated, truncated)
        next_masks = legal() if legal else None
        for i, (action, log_prob, version) in results.items():
            last = next_observations[i]
            if mode is AutoresetMode.SAME_STEP and ended[i]:
                last = info["final_obs"][i]  # the observation returned is the next episode's first
            if train:
                # SAME_STEP: the sub-environment has reset, so its masks are the next episode's
                after = None if next_masks is None or (mode is AutoresetMode.SAME_STEP and ended[i]) else next_masks[i]
                client.log_step(observations[i], action, float(rewards[i]), bool(terminated[i]), bool(truncated[i]),
                                last, log_prob, version, client.last_variant, stream=i,
                                action_mask=None if masks is None else masks[i], next_action_mask=after)
            stats.steps += 1
            ep_return[i] += float(rewards[i])
            ep_len[i] += 1
            if ended[i]:
                _end_episode(stats, float(ep_return[i]), int(ep_len[i]), on_episode)
                ep_return[i], ep_len[i] = 0.0, 0
        if mode is AutoresetMode.DISABLED and ended.any():
            batch, _ = env.reset(options={"reset_mask": ended})
            next_observations = list(iterate(env.observation_space, batch))
            next_masks = legal() if legal else None
        resetting = ended if mode is AutoresetMode.NEXT_STEP else np.zeros(n, dtype=bool)
        observations, masks = next_observations, next_masks


def _batched(env: VectorEnv[Any, Any, Any], actions: list[Any]) -> Any:
    """One action per sub-environment as the vector environment's batched action."""
    out = gym.vector.utils.create_empty_array(env.single_action_space, env.num_envs)
    return gym.vector.utils.concatenate(env.single_action_space, actions, out)
