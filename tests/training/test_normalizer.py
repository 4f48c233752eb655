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


@pytest.mark.parametrize(("poison", "gamma"), [
    (np.r_[np.ones(7), 3e38], 0.99),  # one huge reward, valid float32
    (np.full(4, 1e19), 1.0),  # each squares finitely in float32; their return (4e19) does not
    (np.r_[1.0, np.nan, 1.0], 0.99),
])
def test_a_batch_whose_returns_overflow_float32_squares_leaves_the_statistics_as_they_were(
    poison: np.ndarray, gamma: float
) -> None:
    rng = np.random.default_rng(3)
    good = [rng.normal(1.0, 1.0, size=n).astype(np.float32) for n in (20, 30)]
    ends = [np.zeros(20, dtype=bool), np.zeros(30, dtype=bool)]
    ends[0][9] = True
    clean, poisoned = RewardScaler(gamma), RewardScaler(gamma)
    clean(good[0], ends[0], "a")
    poisoned(good[0], ends[0], "a")
    before = poisoned.state_dict()

    scaled = poisoned(poison.astype(np.float32), np.zeros(len(poison), dtype=bool), "a")
    after = poisoned.state_dict()
    assert after["returns"] == before["returns"] and after["return_rms"]["count"] == before["return_rms"]["count"]
    assert torch.equal(after["return_rms"]["var"], before["return_rms"]["var"])
    # scaled by the statistics as they stand (no overflow warning: warnings are errors here)
    expected = poison / np.sqrt(before["return_rms"]["var"].item() + 1e-8)
    np.testing.assert_allclose(scaled, expected.astype(np.float32), rtol=1e-6)

    # the stream goes on exactly as if the poisoned batch had never come
    np.testing.assert_array_equal(poisoned(good[1], ends[1], "a"), clean(good[1], ends[1], "a"))


def test_returns_up_to_the_float32_squarable_limit_still_merge_in_float64() -> None:
    scaler = RewardScaler(0.0)
    big = np.array([1e19, -1e19, 1e19], dtype=np.float32)
    scaled = scaler(big, np.zeros(3, dtype=bool), "a")
    assert scaler.return_rms.count > 3 and np.isfinite(scaler.return_rms.var)
    assert np.all(np.isfinite(scaled)) and np.all(np.abs(scaled) < 2)
