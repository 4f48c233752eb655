"""Recurrent PPO: chunks of sequences, the unrolled model, and learning a memory task that a
feed-forward policy cannot solve (local, no Ray)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from policy_server.policies.lstm import LSTMPolicy
from policy_server.policies.recurrent import StateLayout
from policy_server.policies.spaces import DiscreteSpace
from policy_server.schema.training import PPOConfig
from policy_server.training.experience import ExperienceBatch
from policy_server.training.sequences import RecurrentPPOLearner, sequence_chunks, unroll


def test_fragments_are_cut_into_padded_chunks_that_never_cross_a_fragment_end() -> None:
    ends = np.array([0, 0, 1, 0, 0, 0, 0, 0], dtype=bool)  # fragments 0..2 and 3..7
    index, valid = sequence_chunks(ends, 3)
    np.testing.assert_array_equal(index, [[0, 1, 2], [3, 4, 5], [6, 7, 7]])
    np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 1, 1], [1, 1, 0]])


def test_unroll_equals_stepping_the_model_by_hand() -> None:
    torch.manual_seed(0)
    actor, layout = LSTMPolicy(3, 4, 2), StateLayout({"h": (1, 4), "c": (1, 4)})
    obs, start = torch.randn(2, 5, 3), torch.randn(2, 8)
    (logits,) = unroll(actor, layout, obs, start)
    h, c = start[:, :4].reshape(2, 1, 4), start[:, 4:].reshape(2, 1, 4)
    for t in range(5):
        expected, h, c = actor(obs[:, t], h, c)
        torch.testing.assert_close(logits[:, t], expected)


class CueRecall:
    """Step 0 shows a cue (left or right); the middle steps show nothing; the last step asks, and
    answering the cue earns 1. A policy that sees only the current observation earns 0.5 at best."""

    def __init__(self, length: int, rng: np.random.Generator) -> None:
        self.length, self.rng = length, rng

    def episodes(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Observations ``(n, length, 3)`` of ``n`` episodes, and their cues ``(n,)``."""
        cues = self.rng.integers(2, size=n)
        obs = np.zeros((n, self.length, 3), dtype=np.float32)
        obs[np.arange(n), 0, cues] = 1.0
        obs[:, -1, 2] = 1.0
        return obs, cues


def play(actor: LSTMPolicy, layout: StateLayout, env: CueRecall, episodes: int, rng: np.random.Generator
         ) -> tuple[ExperienceBatch, float]:
    """``episodes`` episodes played side by side by the actor, as packed experience rows in each
    episode's step order, and their mean return."""
    obs, cues = env.episodes(episodes)
    n, length = episodes, env.length
    state = np.zeros((n, layout.width), dtype=np.float32)
    packed, after, actions, log_probs = [], [], [], []
    for t in range(length):
        rows = np.concatenate([obs[:, t], state], axis=1)
        with torch.no_grad():
            logits, h, c = actor(*layout.model_inputs(torch.from_numpy(rows)))
        log_p = torch.log_softmax(logits, -1).numpy()
        action = (rng.random(n) < np.exp(log_p[:, 1])).astype(np.int64)
        state = np.concatenate([h.reshape(n, -1).numpy(), c.reshape(n, -1).numpy()], axis=1)
        following = obs[:, t + 1] if t + 1 < length else np.zeros((n, 3), dtype=np.float32)
        packed.append(rows)
        after.append(np.concatenate([following, state], axis=1))
        actions.append(action)
        log_probs.append(log_p[np.arange(n), action])
    rewards = np.zeros((n, length), dtype=np.float32)
    rewards[:, -1] = actions[-1] == cues
    last = np.zeros((n, length), dtype=bool)
    last[:, -1] = True

    def rows_of(steps: list[np.ndarray]) -> np.ndarray:  # (length, n, ...) → episode-major (n * length, ...)
        return np.stack(steps, axis=1).reshape(n * length, *steps[0].shape[1:])

    batch = ExperienceBatch(
        obs=rows_of(packed), next_obs=rows_of(after), actions=rows_of(actions)[:, None],
        rewards=rewards.reshape(-1), terminated=last.reshape(-1), truncated=np.zeros(n * length, dtype=bool),
        segment_end=last.reshape(-1), log_probs=rows_of(log_probs).astype(np.float32),
        versions=np.zeros(n * length, dtype=np.int64))
    return batch, float(rewards.sum() / n)


def test_recurrent_ppo_learns_to_recall_a_cue_beyond_the_feed_forward_ceiling() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    actor, layout, env = LSTMPolicy(3, 16, 2), StateLayout({"h": (1, 16), "c": (1, 16)}), CueRecall(4, rng)
    config = PPOConfig(learning_rate=3e-3, rollout_samples=256, num_minibatches=4, update_epochs=4,
                       ent_coef=0.0, critic_hidden=[32])
    learner = RecurrentPPOLearner(actor, 3, layout, DiscreteSpace(2), config, bptt_steps=4, seed=0)
    returns = []
    for _ in range(40):
        batch, mean_return = play(actor, layout, env, 64, rng)
        returns.append(mean_return)
        learner.add(batch)
        if learner.ready():
            learner.update()
        if len(returns) >= 3 and min(returns[-3:]) > 0.9:
            break
    assert returns[0] < 0.7, returns  # an untrained policy guesses
    assert min(returns[-3:]) > 0.9, returns  # a feed-forward policy's ceiling is 0.5


def test_recurrent_ppo_evaluates_masked_logits_so_served_masked_log_probs_give_ratio_one() -> None:
    """Steps acted as a recurrent policy is served under action masks (``space.sample`` with the
    mask: the masked log-probs); the learner's unrolled log-probs must use the batch's masks too."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    actor, layout, space = LSTMPolicy(3, 8, 4), StateLayout({"h": (1, 8), "c": (1, 8)}), DiscreteSpace(4)
    n, length = 6, 5
    obs = rng.normal(size=(n, length + 1, 3)).astype(np.float32)
    masks = rng.random((n, length + 1, 4)) < 0.5
    masks[..., 0] = True  # at least one legal action
    state = layout.zeros(n)
    packed, after, actions, log_probs = [], [], [], []
    for t in range(length):
        rows = np.concatenate([obs[:, t], state], axis=1)
        with torch.no_grad():
            logits, h, c = actor(*layout.model_inputs(torch.from_numpy(rows)))
        answers = space.sample([logits.numpy()], rng, masks[:, t])
        state = np.concatenate([h.reshape(n, -1).numpy(), c.reshape(n, -1).numpy()], axis=1)
        packed.append(rows)
        after.append(np.concatenate([obs[:, t + 1], state], axis=1))
        actions.append(np.array([a.action for a in answers]))
        log_probs.append(np.array([a.log_prob for a in answers], dtype=np.float32))

    def rows_of(steps: list[np.ndarray]) -> np.ndarray:  # (length, n, ...) → episode-major (n * length, ...)
        return np.stack(steps, axis=1).reshape(n * length, *steps[0].shape[1:])

    last = np.zeros((n, length), dtype=bool)
    last[:, -1] = True
    batch = ExperienceBatch(
        obs=rows_of(packed), next_obs=rows_of(after), actions=rows_of(actions)[:, None],
        rewards=rng.normal(size=n * length).astype(np.float32), terminated=last.reshape(-1),
        truncated=np.zeros(n * length, dtype=bool), segment_end=last.reshape(-1), log_probs=rows_of(log_probs),
        versions=np.zeros(n * length, dtype=np.int64),
        masks=masks[:, :length].reshape(-1, 4), next_masks=masks[:, 1:].reshape(-1, 4))  # already episode-major
    config = PPOConfig(rollout_samples=n * length, num_minibatches=1, update_epochs=1, critic_hidden=[8])
    unmasked_actor = copy.deepcopy(actor)
    learner = RecurrentPPOLearner(actor, 3, layout, space, config, bptt_steps=3, seed=0)
    learner.add(batch)
    stats = learner.update()  # the first step at unchanged weights: the ratio is 1 for every step
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6) and stats["clipfrac"] == 0.0
    unmasked = RecurrentPPOLearner(unmasked_actor, 3, layout, space, config, bptt_steps=3, seed=0)
    unmasked.add(dataclasses.replace(batch, masks=None, next_masks=None))
    assert unmasked.update()["approx_kl"] > 1e-3  # without the masks, the served log-probs disagree
