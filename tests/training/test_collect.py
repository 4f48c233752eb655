"""``StepCollector``: Pathmind-style acting calls paired into steps and fragments, per client."""

from __future__ import annotations

import numpy as np

from policy_server.training.collect import Acted, StepCollector


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def acted(t: float, version: int = 0, action: int = 0) -> Acted:
    """The call at time ``t``: observation ``[t, t]``, log-prob ``-t``."""
    return Acted(np.array([t, t], dtype=np.float32), np.array([action]), -t, version)


def test_an_episode_becomes_one_fragment_when_done_and_its_first_reward_is_ignored() -> None:
    collector = StepCollector(Clock())
    assert collector.step("a", acted(0, action=1), reward=99.0, done=False) == []
    assert collector.step("a", acted(1, action=0), reward=1.0, done=False) == []
    [episode] = collector.step("a", acted(2), reward=2.0, done=True)
    assert episode.client_id == "a"
    np.testing.assert_array_equal(episode.obs, [[0, 0], [1, 1]])
    np.testing.assert_array_equal(episode.next_obs, [[1, 1], [2, 2]])
    np.testing.assert_array_equal(episode.actions, [[1], [0]])
    np.testing.assert_array_equal(episode.rewards, [1.0, 2.0])
    np.testing.assert_array_equal(episode.log_probs, [0.0, -1.0])
    np.testing.assert_array_equal(episode.terminated, [False, True])
    np.testing.assert_array_equal(episode.segment_end, [False, True])
    assert not episode.truncated.any() and len(collector) == 0
    # the call after `done` starts a new episode: it completes no step
    assert collector.step("a", acted(3), reward=5.0, done=False) == []
    [next_episode] = collector.step("a", acted(4), reward=1.0, done=True)
    np.testing.assert_array_equal(next_episode.obs, [[3, 3]])


def test_clients_are_paired_separately() -> None:
    collector = StepCollector(Clock())
    collector.step("a", acted(0), 0.0, False)
    collector.step("b", acted(10), 0.0, False)
    collector.step("a", acted(1), 1.0, False)
    [b] = collector.step("b", acted(11), 5.0, True)
    [a] = collector.step("a", acted(2), 1.0, True)
    np.testing.assert_array_equal(a.obs[:, 0], [0, 1])
    np.testing.assert_array_equal(b.obs[:, 0], [10])
    assert (a.client_id, b.client_id) == ("a", "b") and b.rewards.tolist() == [5.0]


def test_a_long_episode_is_cut_into_fragments_that_bootstrap() -> None:
    collector = StepCollector(Clock(), fragment_steps=3)
    out = [batch for t in range(8) for batch in collector.step("a", acted(t), 1.0, False)]
    assert [len(b) for b in out] == [3, 3]
    assert not any(b.terminated.any() for b in out) and all(b.segment_end[-1] for b in out)
    np.testing.assert_array_equal(out[1].obs[:, 0], [3, 4, 5])


def test_a_new_model_version_closes_the_fragment_of_the_old_one() -> None:
    collector = StepCollector(Clock())
    collector.step("a", acted(0, version=0), 0.0, False)
    collector.step("a", acted(1, version=0), 1.0, False)
    # the step acted at t=1 by version 0 completes; the next pending one is version 1
    assert collector.step("a", acted(2, version=1), 1.0, False) == []
    [old] = collector.step("a", acted(3, version=1), 1.0, False)
    assert old.versions.tolist() == [0, 0] and not old.terminated.any()
    [new] = collector.step("a", acted(4, version=1), 1.0, True)
    assert new.versions.tolist() == [1, 1] and new.terminated.tolist() == [False, True]


def test_silent_clients_expire_and_the_least_recent_is_dropped_beyond_the_bound() -> None:
    clock = Clock()
    collector = StepCollector(clock, expiry_s=10, max_clients=2)
    collector.step("a", acted(0), 0.0, False)
    collector.step("a", acted(1), 1.0, False)
    clock.now = 11
    [expired] = collector.step("b", acted(0), 0.0, False)  # a's complete step is handed over
    assert expired.client_id == "a" and len(expired) == 1 and len(collector) == 1
    # a comes back: its pending step died, so this call starts over
    assert collector.step("a", acted(2), 1.0, False) == [] and len(collector) == 2
    collector.step("c", acted(0), 0.0, False)  # b is the least recently seen: dropped (no steps)
    assert len(collector) == 2
    assert collector.step("b", acted(1), 1.0, True) == []  # nothing pending for b any more
