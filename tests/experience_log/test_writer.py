"""The log's writer on real files: round trips of any shape and dtype, rotation, the folder's
bound, a full queue, a failing disk, and a writer killed mid-write."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import wait_until

from policy_server.experience_log.files import log_files, read_log
from policy_server.experience_log.records import Asker, Decisions, Outcomes
from policy_server.experience_log.writer import ExperienceLog
from policy_server.policies.spaces import ActionSample
from policy_server.schema.experience_log import ExperienceLogSpec

ROOT = Path(__file__).resolve().parents[2]


def spec(path: Path, **over: Any) -> ExperienceLogSpec:
    return ExperienceLogSpec(path=path, **{"flush_s": 0.02, **over})


def decisions(obs: np.ndarray, request_id: str = "r1", t: int = 1, episode_id: str | None = None) -> Decisions:
    samples = [ActionSample(action=[i, 2], log_prob=-float(i), probability=None) for i in range(len(obs))]
    return Decisions(t, "p", Asker(request_id, "/predict/batch", episode_id), obs, samples, 7, "stable")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
@pytest.mark.parametrize("obs", [
    np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3),  # images stay uint8
    np.array([[1.5e-7, -3.25, 1e30]], dtype=np.float32),
    np.array([[2**40, -1]], dtype=np.int64),
], ids=["uint8-image", "float32", "int64"])
def test_decisions_and_outcomes_read_back_exactly(tmp_path: Path, fmt: str, obs: np.ndarray) -> None:
    log = ExperienceLog(spec(tmp_path, format=fmt), "p")
    log.open()
    log.submit(decisions(obs, episode_id="ep"))
    log.submit(Outcomes(2, "p", Asker("r2", "/train/experience", client_id="c"), ["r1/0", "r1/1"][:len(obs)],
                        [0.5] * len(obs), [True] * len(obs), [False] * len(obs), obs))
    log.close()
    got = read_log(tmp_path)
    assert [r.kind for r in got] == ["decision"] * len(obs) + ["outcome"] * len(obs)
    for i, r in enumerate(got[:len(obs)]):
        assert r.obs is not None and r.obs.dtype == obs.dtype and np.array_equal(r.obs, obs[i])
        assert r.action is not None and r.action.tolist() == [i, 2] and r.log_prob == -i and r.model_version == 7
        assert r.episode_id == (f"ep/{i}") and r.request_id == "r1" and r.row == i
    last = got[-1]
    assert last.ref == f"r1/{len(obs) - 1}" and last.reward == 0.5 and last.terminated and last.client_id == "c"
    assert last.obs is not None and np.array_equal(last.obs, obs[-1])
    assert log.written == 2 * len(obs) and log.dropped == {"queue_full": 0, "write_error": 0}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_files_rotate_at_their_size_and_the_folder_keeps_its_bound(tmp_path: Path, fmt: str) -> None:
    image = np.zeros((4, 16, 16, 3), dtype=np.uint8)  # 3 KiB a request
    log = ExperienceLog(spec(tmp_path, format=fmt, max_file_mb=0.015, max_total_mb=0.1, flush_s=0.001), "p")
    log.open()
    for n in range(150):
        log.submit(decisions(image + n % 200, request_id=f"r{n}", t=n))
        time.sleep(0.002)  # a flush every few requests
    log.close()
    files = log_files(tmp_path)
    assert 1 <= len(files) < log._namer._n and not any(p.name.endswith(".tmp") for p in files)  # some deleted
    sizes = [p.stat().st_size for p in files]
    assert sum(sizes[:-1]) <= 0.1 * 2**20  # the bound (the newest file is always kept)
    ids = [int(r.request_id[1:]) for r in read_log(tmp_path)[::4]]
    assert ids == list(range(ids[0], 150)) and ids[0] > 0  # the oldest went, the newest stayed, in order


def test_the_spaces_file_leaves_another_writers_temporary_alone(tmp_path: Path) -> None:
    other = tmp_path / f"p.spaces.json.{os.getpid()}.tmp"  # a gateway on another host, with our pid, writing
    other.write_text("half of a spaces fi")
    log = ExperienceLog(spec(tmp_path), "p", {"policy": "p"})
    log.open()
    log.close()
    assert json.loads((tmp_path / "p.spaces.json").read_text()) == {"policy": "p"}
    assert other.read_text() == "half of a spaces fi"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.spaces.json", other.name]  # and no temporary of ours


def test_a_full_queue_drops_and_counts_without_waiting(tmp_path: Path) -> None:
    log = ExperienceLog(spec(tmp_path, queue_size=2), "p")  # not opened: nothing drains the queue
    start = time.perf_counter()
    for n in range(1000):
        log.submit(decisions(np.zeros((3, 4), dtype=np.float32), request_id=f"r{n}"))
    assert time.perf_counter() - start < 0.5
    assert log.dropped["queue_full"] == 998 * 3


def test_a_failing_disk_is_logged_and_counted_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the log's folder should be")
    log = ExperienceLog(spec(blocked), "p")
    with caplog.at_level(logging.ERROR):
        log.open()
        log.submit(decisions(np.zeros((2, 4), dtype=np.float32)))
        wait_until(lambda: log.dropped["write_error"] == 2, timeout=10)
        log.close()
    assert "cannot write" in caplog.text and log.written == 0


KILLED_WRITER = """
import sys, time, numpy as np
from pathlib import Path
from policy_server.experience_log.records import Asker, Decisions
from policy_server.experience_log.writer import ExperienceLog
from policy_server.schema.experience_log import ExperienceLogSpec
from collections import namedtuple
ActionSample = namedtuple("ActionSample", "action log_prob probability")  # the served one's fields, without torch
logs = [ExperienceLog(ExperienceLogSpec(path=Path(sys.argv[1]) / f, format=f, flush_s=0.005, rotate_s=0.05), "p")
        for f in ("parquet", "jsonl")]
for log in logs:
    log.open()
n = 0
while True:
    obs = np.full((8, 16), n, dtype=np.float32)
    samples = [ActionSample(action=1, log_prob=-1.0, probability=None)] * 8
    for log in logs:
        log.submit(Decisions(n, "p", Asker(f"r{n}", "/predict"), obs, samples, 0, "stable"))
    n += 1
    time.sleep(0.0005)
"""


def test_a_writer_killed_mid_write_leaves_readable_files(tmp_path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=ROOT)
    try:
        wait_until(lambda: all(len(list((tmp_path / f).glob(f"*.{f}"))) >= 3 for f in ("parquet", "jsonl")), timeout=60)
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    for fmt in ("parquet", "jsonl"):  # mid-write: a Parquet .tmp without its footer, a torn JSON line
        records = read_log(tmp_path / fmt)
        assert len(records) >= 8 and all(r.obs is not None and r.obs.shape == (16,) for r in records)
        ids = [int(r.request_id[1:]) for r in records]
        assert ids == sorted(ids) and set(np.diff(ids)) <= {0, 1}, fmt  # no hole, but at the end
