"""What a GRPO run acknowledged and no checkpoint holds yet, on disk in the run's folder.

- ``START_FILE`` (``run.json``): written once when the run starts (run id, settings, the model and
  adapter it started from), so a run that dies before its first checkpoint resumes from its start.
- ``JOURNAL_FILE`` (``cycles.journal``): one line per trained cycle, appended and fsynced before the
  rewards are answered: the group (prompt and completion token ids, the sampling log-probs, the
  cycle that sampled it), its id, its rewards, and the run's counters after it. A checkpoint of
  cycle n forgets the lines up to n.

A run resumed after its process died loads its newest checkpoint (or its start) and trains the
journaled cycles after it again, in order (``GRPORun.resume``): no acknowledged cycle is lost. The
groups handed out and not yet rewarded are not journaled (a line per completion request would cost
an fsync each); their rewards are answered 410 ``group_lost``.

Lines are JSON (Python's float repr round-trips exactly; no pickle, so reading runs no code). A
line that a crash cut short ends the journal and the next append writes over it. JSON lines and
``files.atomic_file`` are the libraries; the framing is ours, as in ``training.journal`` (whose
records are safetensors arrays, not token lists).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy_server.files import atomic_file, atomic_write_text, write_durably_at
from policy_server.llm.grpo_step import Group

START_FILE = "run.json"
JOURNAL_FILE = "cycles.journal"


@dataclass(frozen=True)
class Cycle:
    """One trained cycle as journaled: ``cycle`` is the run's cycle after it (1 for the first)."""

    cycle: int
    group_id: str
    group: Group
    rewards: list[float]
    counters: dict[str, Any]
    """The run's counters after the cycle, but its reward history (replaying rebuilds that)."""

    def line(self) -> bytes:
        g = self.group
        record = {"cycle": self.cycle, "group_id": self.group_id, "prompt_ids": g.prompt_ids,
                  "completions": g.completions, "old_log_probs": g.old_log_probs, "group_cycle": g.cycle,
                  "rewards": self.rewards, "counters": self.counters}
        return (json.dumps(record, separators=(",", ":")) + "\n").encode()

    @classmethod
    def parse(cls, line: bytes) -> Cycle:
        r = json.loads(line)
        group = Group(r["prompt_ids"], r["completions"], r["old_log_probs"], r["group_cycle"])
        return cls(r["cycle"], r["group_id"], group, r["rewards"], r["counters"])


def write_start(folder: Path, record: dict[str, Any]) -> None:
    """Record how a run started (``START_FILE``, atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / START_FILE, json.dumps(record, indent=1) + "\n")


def read_start(folder: Path) -> dict[str, Any] | None:
    """How the run in ``folder`` started, or None (no such run, or one started before this file)."""
    path = folder / START_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class CycleJournal:
    """The journal of one run (``JOURNAL_FILE`` in its folder); used under the run's lock."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / JOURNAL_FILE
        self._end: int | None = None
        """Where the next line goes (the end of the last whole line), once known."""

    def append(self, cycle: Cycle) -> None:
        """Write the cycle's line and fsync it."""
        if self._end is None:
            self._end = sum(len(line) for line in self._lines())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = cycle.line()
        self._end = write_durably_at(self.path, self._end, line)  # over a line a crash cut short, if any

    def after(self, cycle: int) -> list[Cycle]:
        """The journaled cycles after ``cycle``, oldest first."""
        return [c for c in map(Cycle.parse, self._lines()) if c.cycle > cycle]

    def forget_through(self, cycle: int) -> None:
        """Drop the lines up to ``cycle`` (a checkpoint holds them now); the rest is rewritten atomically."""
        keep = [c.line() for c in self.after(cycle)]
        if not keep and not self.path.exists():
            return
        with atomic_file(self.path) as f:
            f.write(b"".join(keep))
        self._end = sum(len(line) for line in keep)

    def _lines(self) -> Iterator[bytes]:
        """The whole lines, up to the first one a crash cut short (no newline, or not JSON)."""
        if not self.path.exists():
            return
        for line in self.path.read_bytes().splitlines(keepends=True):
            if not line.endswith(b"\n"):
                return
            try:
                json.loads(line)
            except ValueError:
                return
            yield line
