"""Several writers in one folder (processes of one host here): retention never deletes a file a live
writer holds, even through its rename, and reclaims a killed writer's; readers keep what they opened."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import wait_until

from policy_server.experience_log.files import (
    create_held,
    enforce_total,
    log_files,
    read_log,
    read_records,
)
from policy_server.experience_log.records import Asker, Decisions
from policy_server.experience_log.writer import ExperienceLog
from policy_server.policies.spaces import ActionSample
from policy_server.schema.experience_log import ExperienceLogSpec

ROOT = Path(__file__).resolve().parents[2]
FORMATS = ("parquet", "jsonl")

# Gateway A: logs ``argv[2]`` requests of 4 rows to <folder>/parquet and <folder>/jsonl, says "ready"
# once they are written, and keeps its files open until a line arrives on stdin (then closes them).
HOLDER = """
import sys, time, numpy as np
from collections import namedtuple
from pathlib import Path
from policy_server.experience_log.records import Asker, Decisions
from policy_server.experience_log.writer import ExperienceLog
from policy_server.schema.experience_log import ExperienceLogSpec
ActionSample = namedtuple("ActionSample", "action log_prob probability")  # the served one's fields, without torch
folder, n = Path(sys.argv[1]), int(sys.argv[2])
logs = [ExperienceLog(ExperienceLogSpec(path=folder / f, format=f, flush_s=0.01, rotate_s=3600), "p") for f in ("parquet", "jsonl")]
for log in logs:
    log.open()
    for i in range(n):
        log.submit(Decisions(i, "p", Asker(f"a{i}", "/predict"), np.full((4, 16, 16, 3), i, np.uint8),
                             [ActionSample(1, -1.0, None)] * 4, 0, "stable"))
deadline = time.monotonic() + 60
while any(log.written < 4 * n for log in logs) and time.monotonic() < deadline:
    time.sleep(0.01)
print("ready", flush=True)
sys.stdin.readline()
for log in logs:
    log.close()
"""


def gateway_a(folder: Path, requests: int) -> subprocess.Popen[str]:
    """Gateway A (another process), its rows written and its files still open."""
    a = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(requests)], cwd=ROOT, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert a.stdout is not None and a.stdout.readline() == "ready\n", "gateway A did not start"
    return a


def gateway_b(folder: Path, fmt: str, requests: int, max_file_mb: float = 0.015) -> ExperienceLog:
    """Gateway B (this process): logs ``requests`` of 3 KiB to ``folder``, each its own flush (files
    rotate every ~5) and keeping the folder under 50 KiB; returns the closed log."""
    log = ExperienceLog(ExperienceLogSpec(path=folder, format=fmt, flush_s=0.001, max_file_mb=max_file_mb,
                                          max_total_mb=0.05), "p")
    log.open()
    for n in range(requests):
        samples = [ActionSample(action=1, log_prob=-1.0, probability=None)] * 4
        log.submit(Decisions(n, "p", Asker(f"b{n}", "/predict"), np.full((4, 16, 16, 3), n, np.uint8), samples, 0, "stable"))
        wait_until(lambda rows=4 * (n + 1): log.written == rows, timeout=10, interval=0.001)
    log.close()
    return log


def ids(folder: Path, prefix: str) -> list[int]:
    return sorted({int(r.request_id[1:]) for r in read_log(folder) if r.request_id.startswith(prefix)})


def test_another_gateways_open_files_survive_retention_and_keep_every_row(tmp_path: Path) -> None:
    a = gateway_a(tmp_path, requests=20)  # 20 × 3 KiB: more than B's whole bound, and the oldest files
    try:
        open_files = {f: log_files(tmp_path / f) for f in FORMATS}
        assert [p.name.endswith(".parquet.tmp") for p in open_files["parquet"]] == [True]
        assert len(open_files["jsonl"]) == 1
        for fmt in FORMATS:
            b = gateway_b(tmp_path / fmt, fmt, requests=60)
            assert b._namer._n > 3 and len(log_files(tmp_path / fmt)) < 1 + b._namer._n, fmt  # B's retention ran
            assert open_files[fmt][0].exists(), f"{fmt}: B's retention deleted A's open file"
    finally:
        a.communicate("close\n", timeout=60)  # A closes its files
    assert a.returncode == 0
    for fmt in FORMATS:
        assert ids(tmp_path / fmt, "a") == list(range(20)), fmt  # every row of A, after A closed
        assert ids(tmp_path / fmt, "b")[-1] == 59, fmt  # and B's newest rows
        assert len(read_log(tmp_path / fmt)) == 4 * (20 + len(ids(tmp_path / fmt, "b"))), fmt


def test_a_killed_writers_files_are_reclaimed(tmp_path: Path) -> None:
    a = gateway_a(tmp_path, requests=2)
    os.kill(a.pid, signal.SIGKILL)  # its locks die with it
    a.communicate(timeout=30)
    for fmt in FORMATS:
        (leftover,) = log_files(tmp_path / fmt)
        gateway_b(tmp_path / fmt, fmt, requests=20)
        assert not leftover.exists(), f"{fmt}: a dead writer's file was kept"


def test_a_held_file_is_kept_through_its_rename_and_deleted_once_released(tmp_path: Path) -> None:
    held_path = tmp_path / "p-1.parquet.tmp"
    held = create_held(held_path, os.O_RDWR)  # a writer of this process: another open file, another lock
    os.write(held, b"x" * 1000)
    newest = tmp_path / "p-2.parquet"
    newest.write_bytes(b"y" * 1000)
    os.utime(held_path, (1, 1))  # the oldest
    assert enforce_total(tmp_path, 0) == [] and held_path.exists()
    os.replace(held_path, tmp_path / "p-1.parquet")  # the writer finishes it: the lock follows the file
    assert enforce_total(tmp_path, 0) == []
    os.close(held)
    assert enforce_total(tmp_path, 0) == [tmp_path / "p-1.parquet"] and newest.exists()  # never the newest


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_deleted_once_opened_is_read_whole(tmp_path: Path, fmt: str) -> None:
    gateway_b(tmp_path, fmt, requests=3, max_file_mb=1)
    (path,) = log_files(tmp_path)
    with path.open("rb") as f:
        path.unlink()  # by another gateway's retention
        records = read_records(f, path.suffix)
    assert sorted({r.request_id for r in records}) == ["b0", "b1", "b2"] and len(records) == 12
