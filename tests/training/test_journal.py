"""The experience journal on disk: records round-trip, a torn tail is dropped, checkpoints trim it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from policy_server.training.experience import ExperienceBatch
from policy_server.training.journal import FILE, ExperienceJournal


def batch(n: int, client: str = "c1", start: float = 0.0) -> ExperienceBatch:
    ends = np.arange(n) == n - 1
    return ExperienceBatch(
        obs=np.arange(n * 3, dtype=np.float32).reshape(n, 3) + start,
        next_obs=np.full((n, 3), np.finfo(np.float32).max, dtype=np.float32),  # the edge of float32, kept exactly
        actions=np.arange(n, dtype=np.int64).reshape(n, 1),
        rewards=np.linspace(-1, 1, n, dtype=np.float32),
        terminated=ends, truncated=np.zeros(n, dtype=bool), segment_end=ends,
        log_probs=np.full(n, np.nan, dtype=np.float32), versions=np.full(n, 7, dtype=np.int64), client_id=client,
    )


def same(a: ExperienceBatch, b: ExperienceBatch) -> bool:
    return a.client_id == b.client_id and all(
        np.array_equal(getattr(a, f), getattr(b, f), equal_nan=True) and getattr(a, f).dtype == getattr(b, f).dtype
        for f in ("obs", "next_obs", "actions", "rewards", "terminated", "truncated", "segment_end", "log_probs", "versions"))


def test_batches_come_back_exactly_in_order_after_a_reopen(tmp_path: Path) -> None:
    journal = ExperienceJournal(tmp_path)
    written = [batch(4, "a"), batch(1, "b", 10.0), batch(1000, "ü-client", 5.0)]  # a thousand rows
    assert [journal.append(b) for b in written] == [1, 2, 3]
    reopened = ExperienceJournal(tmp_path)  # as a restarted trainer opens it
    read = list(reopened.since(0))
    assert [s for s, _ in read] == [1, 2, 3] and all(same(w, r) for w, (_, r) in zip(written, read))
    assert [s for s, _ in reopened.since(2)] == [3]
    assert reopened.append(batch(2)) == 4


def test_a_record_cut_short_by_a_crash_is_dropped_and_written_over(tmp_path: Path) -> None:
    journal = ExperienceJournal(tmp_path)
    journal.append(batch(3, "kept"))
    journal.append(batch(3, "torn"))
    path = tmp_path / FILE
    path.write_bytes(path.read_bytes()[:-20])  # the process died inside the second write
    reopened = ExperienceJournal(tmp_path)
    assert [b.client_id for _, b in reopened.since(0)] == ["kept"]
    assert reopened.append(batch(2, "next")) == 2
    assert [(s, b.client_id) for s, b in ExperienceJournal(tmp_path).since(0)] == [(1, "kept"), (2, "next")]


def test_forgetting_through_a_checkpoint_keeps_only_later_batches(tmp_path: Path) -> None:
    journal = ExperienceJournal(tmp_path)
    for i in range(5):
        journal.append(batch(2, f"c{i}"))
    journal.forget_through(3)
    assert [(s, b.client_id) for s, b in journal.since(0)] == [(4, "c3"), (5, "c4")]
    assert journal.append(batch(1, "c5")) == 6
    assert [s for s, _ in ExperienceJournal(tmp_path).since(0)] == [4, 5, 6]
