"""The per-episode state store: expiry after its idle time, and a bounded, least-recently-used count."""

from __future__ import annotations

import numpy as np

from policy_server.gateway.policy.state import EpisodeStates


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_state_expires_after_its_idle_time_and_each_use_renews_it() -> None:
    clock = Clock()
    store = EpisodeStates(ttl_s=10, max_episodes=5, clock=clock)
    store.put("a", np.ones(3, dtype=np.float32))
    clock.now = 9
    assert store.get("a") is not None
    store.put("a", np.full(3, 2.0, dtype=np.float32))
    clock.now = 18
    np.testing.assert_array_equal(store.get("a"), [2, 2, 2])
    clock.now = 19.5
    assert store.get("a") is None and len(store) == 0


def test_at_most_max_episodes_are_kept_and_the_least_recently_used_goes_first() -> None:
    clock = Clock()
    store = EpisodeStates(ttl_s=100, max_episodes=2, clock=clock)
    for i, episode in enumerate("abc"):
        clock.now = i
        if episode == "c":
            store.get("a")  # a read does not renew: only a step (put) does
            store.put("a", np.zeros(1, dtype=np.float32))
        store.put(episode, np.zeros(1, dtype=np.float32))
    assert len(store) == 2 and store.get("b") is None and store.get("a") is not None


def test_expired_states_are_dropped_when_others_are_kept() -> None:
    clock = Clock()
    store = EpisodeStates(ttl_s=5, max_episodes=10, clock=clock)
    store.put("old", np.zeros(1, dtype=np.float32))
    clock.now = 6
    store.put("new", np.zeros(1, dtype=np.float32))
    assert len(store) == 1
