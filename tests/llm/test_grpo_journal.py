"""A GRPO run's journal of cycles: appended whole or not at all, forgotten up to a checkpoint."""

from __future__ import annotations

from pathlib import Path

from policy_server.llm.grpo_journal import JOURNAL_FILE, Cycle, CycleJournal, read_start, write_start
from policy_server.llm.grpo_step import Group


def cycle(n: int) -> Cycle:
    group = Group([1, 2, 3], [[4, 5], [6]], [[-0.1, -2.5e-9], [-1 / 3]], n - 1)
    return Cycle(n, f"group-{n}", group, [1.0, -0.5], {"groups_handed_out": n, "last_loss": 0.1 * n})


def test_cycles_come_back_exactly_after_the_last_checkpointed_one(tmp_path: Path) -> None:
    journal = CycleJournal(tmp_path)
    for n in (1, 2, 3):
        journal.append(cycle(n))
    reopened = CycleJournal(tmp_path)  # a new process
    assert reopened.after(0) == [cycle(1), cycle(2), cycle(3)]  # floats round-trip exactly
    assert reopened.after(2) == [cycle(3)]
    reopened.forget_through(2)
    assert reopened.after(0) == [cycle(3)] and (tmp_path / JOURNAL_FILE).read_bytes() == cycle(3).line()
    reopened.append(cycle(4))
    assert CycleJournal(tmp_path).after(0) == [cycle(3), cycle(4)]


def test_a_line_a_crash_cut_short_ends_the_journal_and_is_written_over(tmp_path: Path) -> None:
    journal = CycleJournal(tmp_path)
    journal.append(cycle(1))
    with (tmp_path / JOURNAL_FILE).open("ab") as f:
        f.write(cycle(2).line()[:-9])  # the process died in the middle of the write
    reopened = CycleJournal(tmp_path)
    assert reopened.after(0) == [cycle(1)]
    reopened.append(cycle(2))
    assert (tmp_path / JOURNAL_FILE).read_bytes() == cycle(1).line() + cycle(2).line()


def test_the_start_record_round_trips_and_is_none_for_an_unknown_run(tmp_path: Path) -> None:
    assert read_start(tmp_path / "nope") is None
    write_start(tmp_path / "run", {"run_id": "run", "settings": {"lr": 0.5}})
    assert read_start(tmp_path / "run") == {"run_id": "run", "settings": {"lr": 0.5}}
