"""The join of outcomes to decisions, on records written by hand, and against the server's own
pairing of ``/collect_experience`` calls (``training.collect.StepCollector``) as the oracle."""

from __future__ import annotations

import numpy as np

from policy_server.experience_log.join import episodes
from policy_server.experience_log.records import LogRecord, parse_ref
from policy_server.training.collect import Acted, StepCollector


def decision(t: int, request_id: str, obs: float, action: float, row: int = 0, **ids: str) -> LogRecord:
    return LogRecord("decision", t, "p", request_id, row, "/predict", obs=np.array([obs, -obs], dtype=np.float32),
                     action=np.array([action]), log_prob=-0.5, model_version=3, **ids)  # type: ignore[arg-type]


def outcome(t: int, request_id: str, reward: float, terminated: bool = False, truncated: bool = False,
            ref: str | None = None, next_obs: float | None = None, client_id: str | None = None) -> LogRecord:
    obs = None if next_obs is None else np.array([next_obs, -next_obs], dtype=np.float32)
    return LogRecord("outcome", t, "p", request_id, 0, "/x", reward=reward, terminated=terminated,
                     truncated=truncated, ref=ref, obs=obs, client_id=client_id)


def test_a_ref_names_a_request_and_a_row() -> None:
    assert parse_ref("abc") == ("abc", 0)
    assert parse_ref("abc/12") == ("abc", 12)
    assert parse_ref("a.b:c-d") == ("a.b:c-d", 0)


def collect_call(t: int, n: int, obs: float, action: float, reward: float, done: bool) -> list[LogRecord]:
    """What one /collect_experience call logs: the outcome of the previous decision, then its own."""
    return [outcome(t, f"r{n}", reward, terminated=done, next_obs=obs, client_id="c"),
            decision(t + 1, f"r{n}", obs, action, client_id="c")]


def test_collect_rewards_belong_to_the_previous_call_and_done_ends_the_episode() -> None:
    records = []
    for n, (reward, done) in enumerate([(9.0, False), (1.0, False), (2.0, False), (3.0, True), (7.0, False),
                                        (4.0, False), (5.0, True)]):
        records += collect_call(10 * n, n, obs=float(n), action=float(n % 2), reward=reward, done=done)
    found = episodes(reversed(records))  # the order of files does not matter: time does
    assert [len(e) for e in found] == [3, 2]
    first, second = found
    assert first.observations[:, 0].tolist() == [0, 1, 2, 3] and first.actions[:, 0].tolist() == [0, 1, 0]
    assert first.rewards.tolist() == [1, 2, 3] and first.terminated and not first.truncated
    # the call after `done` starts anew: its reward (7) belongs to no step
    assert second.observations[:, 0].tolist() == [4, 5, 6] and second.rewards.tolist() == [4, 5] and second.terminated
    assert first.request_ids == ("r0", "r1", "r2") and first.model_versions.tolist() == [3, 3, 3]


def test_batch_rows_are_streams_of_their_own_joined_by_request_id_and_row() -> None:
    records = []
    for step in range(3):  # two environments of a vector, stepped by one batch request each
        for row in range(2):
            records.append(decision(10 * step, f"b{step}", obs=10 * row + step, action=row, row=row,
                                    episode_id=f"vec/{row}"))
    records += [outcome(5, "t1", 1.0, ref="b0/0"), outcome(5, "t1", 2.0, ref="b0/1"),
                outcome(15, "t2", 1.5, ref="b1/0", truncated=True, next_obs=99.0), outcome(15, "t2", 2.5, ref="b1/1"),
                outcome(25, "t3", 3.5, ref="b2/1", terminated=True, next_obs=77.0),
                outcome(26, "t4", 100.0, ref="b2/1")]  # a second outcome of one decision: the first counts
    found = {e.stream: e for e in episodes(records)}
    env0, env1 = found["p/episode/vec/0"], found["p/episode/vec/1"]
    assert env0.observations[:, 0].tolist() == [0, 1, 99] and env0.truncated and not env0.terminated
    assert env1.observations[:, 0].tolist() == [10, 11, 12, 77] and env1.rewards.tolist() == [2.0, 2.5, 3.5]
    assert env1.terminated and env1.actions[:, 0].tolist() == [1, 1, 1]


def test_a_decision_without_its_reward_ends_a_run_without_an_end() -> None:
    records = [decision(0, "a", 0.0, 1, episode_id="e"), decision(1, "b", 1.0, 0, episode_id="e"),
               decision(2, "c", 2.0, 1, episode_id="e"), decision(3, "d", 3.0, 1, episode_id="e"),
               outcome(4, "x", 1.0, ref="a"), outcome(4, "x", 2.0, ref="c")]
    found = episodes(records)
    assert [(e.observations[:, 0].tolist(), e.ended) for e in found] == [([0.0, 1.0], False), ([2.0, 3.0], False)]


def test_the_join_pairs_collect_calls_as_the_server_pairs_them_for_training() -> None:
    rng = np.random.default_rng(0)
    collector = StepCollector(clock=lambda: 0.0, fragment_steps=10_000)
    records, fragments = [], []
    for n in range(300):
        obs, action, reward, done = float(n), float(rng.integers(2)), float(rng.normal()), bool(rng.random() < 0.1)
        records += collect_call(10 * n, n, obs, action, reward, done)
        acted = Acted(np.array([obs, -obs], dtype=np.float32), np.array([int(action)]), -0.5, 3)
        fragments += collector.step("c", acted, reward, done)
    found = [e for e in episodes(records) if e.ended]
    assert len(found) == len(fragments) > 10
    for e, f in zip(found, fragments):
        assert np.array_equal(e.observations[:-1], f.obs) and np.array_equal(e.observations[1:], f.next_obs)
        assert np.array_equal(e.actions.astype(np.int64), f.actions)
        assert np.array_equal(e.rewards.astype(np.float32), f.rewards) and f.terminated[-1] == e.terminated
