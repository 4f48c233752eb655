"""Episode returns across fragments, the best moving average, active clients and sample rate."""

from __future__ import annotations

import numpy as np
import pytest

from policy_server.training.telemetry import Telemetry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_returns_add_up_across_a_clients_fragments_and_clients_stay_apart() -> None:
    t = Telemetry(window=3, client_timeout_s=30, clock=Clock())
    t.record_steps("a", np.array([1.0, 1.0]), np.array([False, False]))
    t.record_steps("b", np.array([5.0]), np.array([True]))
    t.record_steps("a", np.array([1.0, 2.0, 7.0]), np.array([False, True, True]))
    assert list(t.returns) == [5.0, 5.0, 7.0]
    assert t.clients["a"].episodes == 2 and t.clients["a"].last_return == 7.0
    assert t.clients["b"].last_return == 5.0 and t.episodes == 3


def test_the_best_average_improves_only_over_a_full_window() -> None:
    t = Telemetry(window=2, client_timeout_s=30, clock=Clock())
    assert not t.record_steps("a", np.array([10.0]), np.array([True]))  # one episode: no full window
    assert t.record_steps("a", np.array([20.0]), np.array([True]))  # mean 15: the first best
    assert t.best_mean_return == 15.0
    assert not t.record_steps("a", np.array([5.0]), np.array([True]))  # mean 12.5
    assert t.record_steps("a", np.array([30.0]), np.array([True]))  # mean 17.5
    assert t.best_mean_return == pytest.approx(17.5) and t.mean_return == pytest.approx(17.5)


def test_clients_go_inactive_after_the_timeout_and_the_rate_covers_a_window() -> None:
    clock = Clock()
    t = Telemetry(window=5, client_timeout_s=30, clock=clock, rate_window_s=10)
    t.record_steps("a", np.ones(100), np.zeros(100, dtype=bool))
    clock.now += 5
    t.record_steps("b", np.ones(100), np.zeros(100, dtype=bool))
    assert t.active_clients() == 2
    assert t.samples_per_second() == pytest.approx(200 / 5)
    clock.now += 28
    assert t.active_clients() == 1  # a: 33 s ago
    assert t.samples_per_second() == 0.0


def test_state_round_trip_keeps_returns_and_best() -> None:
    t = Telemetry(window=2, client_timeout_s=30, clock=Clock())
    t.record_steps("a", np.array([3.0, 4.0]), np.array([True, True]))
    other = Telemetry(window=2, client_timeout_s=30, clock=Clock())
    other.load_state_dict(t.state_dict())
    assert list(other.returns) == [3.0, 4.0] and other.best_mean_return == 3.5 and other.episodes == 2


def test_returns_of_float32_rewards_near_its_max_are_summed_in_float64() -> None:
    telemetry = Telemetry(window=1, client_timeout_s=30.0, clock=lambda: 0.0)
    rewards = np.full(8, 3e38, dtype=np.float32)  # their float32 sum overflows (with a warning)
    telemetry.record_steps("c", rewards, np.r_[np.zeros(7, dtype=bool), True])
    assert telemetry.last_return == pytest.approx(8 * 3e38, rel=1e-6) and np.isfinite(telemetry.mean_return)
