"""Pure maths of policy_server.policies.distributions against naive oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policy_server.policies import distributions as D


def naive_log_softmax(x: np.ndarray) -> np.ndarray:
    return np.log(np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True))


def naive_gaussian_log_prob(x: list[float], mean: list[float], log_std: list[float]) -> float:
    total = 0.0
    for xi, mi, si in zip(x, mean, log_std):
        std = math.exp(si)
        total += -((xi - mi) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return total


def test_log_softmax_matches_naive_on_moderate_logits() -> None:
    logits = np.random.default_rng(0).normal(scale=3.0, size=(5, 7))
    got = D.log_softmax(logits)
    assert got.shape == (5, 7)
    np.testing.assert_allclose(got, naive_log_softmax(logits), rtol=0, atol=1e-12)


def test_log_softmax_accepts_float32_and_sums_to_one() -> None:
    logits = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    got = D.log_softmax(logits)
    np.testing.assert_allclose(np.exp(got).sum(axis=-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(got, naive_log_softmax(logits.astype(np.float64)), atol=1e-12)


def test_log_softmax_is_finite_where_the_naive_one_overflows() -> None:
    logits = np.array([[1000.0, 1001.0, 1002.0], [-1000.0, 0.0, 1000.0]])
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        assert not np.isfinite(naive_log_softmax(logits)).all()
    got = D.log_softmax(logits)
    assert np.isfinite(got).all()
    # shift invariance: the first row equals the naive version of its shifted logits
    np.testing.assert_allclose(got[0], naive_log_softmax(logits[0] - 1000.0), atol=1e-12)
    np.testing.assert_allclose(got[1], [-2000.0, -1000.0, 0.0], atol=1e-9)


def test_gather_picks_one_value_per_row() -> None:
    values = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(D.gather(values, np.array([0, 3, 2])), [0.0, 7.0, 10.0])


def test_sample_categorical_frequencies_match_softmax() -> None:
    logits = np.array([1.0, 0.0, -1.0, 2.0, 0.5])
    draws = 20000
    rng = np.random.default_rng(1234)
    actions = D.sample_categorical(np.tile(logits, (draws, 1)), rng)
    assert actions.shape == (draws,)
    counts = np.bincount(actions, minlength=len(logits))
    expected = draws * np.exp(naive_log_softmax(logits))
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 4 degrees of freedom: P(chi2 > 18.47) = 0.001
    assert chi2 < 18.47, (counts, expected)


def test_sample_categorical_is_reproducible_and_respects_certain_actions() -> None:
    logits = np.random.default_rng(0).normal(size=(50, 6))
    a = D.sample_categorical(logits, np.random.default_rng(7))
    b = D.sample_categorical(logits, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    certain = np.full((100, 4), -1e9)
    certain[:, 2] = 0.0
    np.testing.assert_array_equal(D.sample_categorical(certain, np.random.default_rng(0)), 2)


@pytest.mark.parametrize("d", [1, 3])
def test_gaussian_log_prob_matches_scalar_loop(d: int) -> None:
    rng = np.random.default_rng(d)
    x, mean = rng.normal(size=(4, d)), rng.normal(size=(4, d))
    log_std = rng.uniform(-2.0, 1.0, size=(4, d))
    got = D.gaussian_log_prob(x, mean, log_std)
    assert got.shape == (4,)
    want = [naive_gaussian_log_prob(list(x[b]), list(mean[b]), list(log_std[b])) for b in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_gaussian_log_prob_of_standard_normal_at_zero() -> None:
    got = D.gaussian_log_prob(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)))
    np.testing.assert_allclose(got, [-math.log(2 * math.pi)], atol=1e-15)
