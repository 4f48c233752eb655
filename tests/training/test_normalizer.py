"""Running statistics against numpy over the same data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from policy_server.training.normalizer import RewardScaler, RunningMeanStd


def test_running_mean_and_variance_equal_numpys_over_all_batches() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 3)) for n in (1, 17, 5, 64, 2)]
    rms = RunningMeanStd(shape=(3,), epsilon=0.0)
    for b in batches:
        rms.update(b)
    data = np.concatenate(batches)
    np.testing.assert_allclose(rms.mean, data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(rms.var, data.var(axis=0), rtol=1e-12)
    assert rms.count == len(data)


def test_the_prior_count_barely_moves_the_estimate_and_empty_batches_change_nothing() -> None:
    data = np.random.default_rng(1).normal(-1.0, 0.5, size=1000)
    rms = RunningMeanStd()
    rms.update(data[:400])
    rms.update(np.empty(0))
    rms.update(data[400:])
    assert rms.mean == pytest.approx(data.mean(), rel=1e-5)
    assert rms.var == pytest.approx(data.var(), rel=1e-5)


def naive_discounted_returns(rewards: list[float], ends: list[bool], gamma: float, start: float = 0.0) -> list[float]:
    out, running = [], start
    for r, end in zip(rewards, ends):
        running = running * gamma + r
        out.append(running)
        running = 0.0 if end else running
    return out


def test_reward_scaler_divides_by_the_std_of_each_streams_discounted_return() -> None:
    rng = np.random.default_rng(2)
    gamma = 0.9
    a1, b1, a2 = (rng.normal(1.0, 1.0, size=n).astype(np.float32) for n in (30, 20, 25))
    a_ends = np.zeros(55, dtype=bool)
    a_ends[[9, 40]] = True  # episodes of stream a end in both of its batches
    b_ends = np.zeros(20, dtype=bool)
    scaler = RewardScaler(gamma)
    scaler(a1, a_ends[:30], "a")
    scaler(b1, b_ends, "b")
    scaled = scaler(a2, a_ends[30:], "a")

    # stream a's return carries over from its first batch to its second; b's is separate
    returns = (naive_discounted_returns(np.concatenate([a1, a2]).tolist(), a_ends.tolist(), gamma)
               + naive_discounted_returns(b1.tolist(), b_ends.tolist(), gamma))
    np.testing.assert_allclose(scaled, a2 / np.sqrt(np.var(returns)), rtol=1e-4)
    assert scaled.dtype == np.float32


def test_reward_scaler_state_round_trips_through_a_weights_only_load() -> None:
    scaler = RewardScaler(0.99)
    rewards = np.arange(10, dtype=np.float32)
    scaler(rewards, np.zeros(10, dtype=bool), "client-1")
    buffer = io.BytesIO()
    torch.save(scaler.state_dict(), buffer)
    buffer.seek(0)
    restored = RewardScaler(0.99)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    more, ends = np.ones(5, dtype=np.float32), np.zeros(5, dtype=bool)
    np.testing.assert_array_equal(restored(more, ends, "client-1"), scaler(more, ends, "client-1"))
