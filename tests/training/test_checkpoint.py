"""Checkpoint store: round-trip, pruning, atomic writes, name checks, weights-only loads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from policy_server.errors import InvalidRequest, NotFound
from policy_server.training.checkpoint import CheckpointStore, periodic_name


def state(value: float) -> dict[str, Any]:
    return {
        "actor": {"w": torch.full((2, 3), value)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.999)}]},
        "samples": 12, "name": "p", "flag": True, "nothing": None, "lr": 2.5e-4,
    }


@pytest.fixture()
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "ckpt", keep=2)


def test_round_trip(store: CheckpointStore) -> None:
    path = store.save("best", state(1.5))
    assert path == store.root / "best.pt"
    loaded = store.load("best")
    assert torch.equal(loaded["actor"]["w"], torch.full((2, 3), 1.5))
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert {k: loaded[k] for k in ("samples", "name", "flag", "nothing", "lr")} == {
        "samples": 12, "name": "p", "flag": True, "nothing": None, "lr": 2.5e-4}


def names(store: CheckpointStore) -> list[str]:
    return [e["name"] for e in store.list()]


def test_only_the_newest_periodic_checkpoints_are_kept(store: CheckpointStore) -> None:
    store.save("best", state(0))
    store.save("saved-20260101T000000", state(0))
    for updates in (10, 20, 30, 40):
        store.save(periodic_name(updates), state(updates))
    assert names(store) == ["update-00000040", "update-00000030", "saved-20260101T000000", "best"]
    store.save("final", state(0))
    assert store.latest() == "final"
    assert sorted(os.listdir(store.root)) == sorted(f"{n}.pt" for n in names(store))


def test_latest_is_the_last_written_even_within_the_same_millisecond(store: CheckpointStore) -> None:
    for name in ("z", "b", "a", "update-00000009", "best"):
        store.save(name, {"x": 1})
        assert store.latest() == name


def test_list_gives_size_and_time(store: CheckpointStore) -> None:
    path = store.save("a", state(0))
    [entry] = store.list()
    assert entry == {"name": "a", "bytes": path.stat().st_size, "modified": pytest.approx(path.stat().st_mtime)}
    assert entry["bytes"] > 0


def test_an_empty_store_has_no_latest_and_missing_ones_are_not_found(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "never-created", keep=1)
    assert store.latest() is None and store.list() == []
    with pytest.raises(NotFound, match="no checkpoint 'best'"):
        store.load("best")


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "..", "a b", "ü", "x" * 129, "a\\b"])
def test_bad_names_are_refused(store: CheckpointStore, name: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid checkpoint name"):
        store.save(name, state(0))
    with pytest.raises(InvalidRequest, match="invalid checkpoint name"):
        store.load(name)


def assert_only_previous_checkpoint(store: CheckpointStore) -> None:
    assert sorted(os.listdir(store.root)) == ["best.pt"]  # no temp file left behind
    assert torch.equal(store.load("best")["actor"]["w"], torch.full((2, 3), 1.0))


def test_a_failed_rename_leaves_the_previous_checkpoint_and_no_temp_file(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.save("best", state(1.0))

    def disk_gone(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", disk_gone)
    with pytest.raises(OSError, match="disk gone"):
        store.save("best", state(2.0))
    assert_only_previous_checkpoint(store)


def test_a_save_failing_partway_through_writing_leaves_the_previous_checkpoint(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.save("best", state(1.0))
    real_save = torch.save

    def save_then_fail(obj: Any, f: Any) -> None:
        real_save(obj, f)
        f.truncate(f.tell() // 2)  # half a file on disk, then the write fails
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="no space"):
        store.save("best", state(2.0))
    assert_only_previous_checkpoint(store)


def test_a_state_weights_only_cannot_load_is_refused_before_writing(store: CheckpointStore) -> None:
    store.save("best", state(1.0))
    with pytest.raises(TypeError, match=r"state\.buffer\.obs is a ndarray.*store arrays as tensors"):
        store.save("best", {"buffer": {"obs": np.zeros(3)}})
    assert_only_previous_checkpoint(store)


class Payload:
    """Stands for anything pickle would run code for on load."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo should-never-run",))


def test_load_refuses_a_file_with_an_arbitrary_pickled_object(store: CheckpointStore) -> None:
    store.root.mkdir(parents=True)
    with open(store.root / "evil.pt", "wb") as f:
        torch.save({"x": Payload()}, f)
    with pytest.raises(InvalidRequest, match="cannot be loaded safely"):
        store.load("evil")



@pytest.mark.parametrize("content", [b"not a checkpoint", b""])
def test_load_refuses_a_file_that_is_not_a_checkpoint(store: CheckpointStore, content: bytes) -> None:
    store.root.mkdir(parents=True)
    (store.root / "junk.pt").write_bytes(content)
    with pytest.raises(InvalidRequest, match="checkpoint 'junk'"):
        store.load("junk")


def test_opening_a_store_removes_what_a_killed_save_left_and_keeps_the_checkpoints(tmp_path: Path) -> None:
    """The issue's case: a server killed mid-save leaves its temporary file; the next start cleans it."""
    import signal
    import subprocess
    import sys

    root = tmp_path / "ckpt"
    CheckpointStore(root, keep=2).save("kept", state(1.0))
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from policy_server.files import atomic_file\n"
        f"with atomic_file(Path({str(root / 'half.pt')!r})) as f:\n"
        "    f.write(b'x' * 4096); f.flush(); print('writing', flush=True); time.sleep(60)\n"
    )], stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"writing\n"
        assert [p.name for p in root.iterdir() if p.name.startswith(".half.pt.partial-")]
        store = CheckpointStore(root, keep=2)  # a second process opens while the writer lives: kept
        assert any(p.name.startswith(".half.pt.partial-") for p in root.iterdir())
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    store = CheckpointStore(root, keep=2)  # the next start
    assert sorted(p.name for p in root.iterdir()) == ["kept.pt"]
    assert store.load("kept")["lr"] == 2.5e-4
