"""Atomic files and folders: the old content or the new, never a part, whenever the writer dies."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from policy_server import files
from policy_server.files import (
    atomic_file,
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_text,
    replacing_dir,
)

ROOT = Path(__file__).resolve().parents[1]
OLD = {"config.json": b'{"version": "old"}', "weights.bin": b"o" * 5000, "sub/tokenizer.json": b"old"}
NEW = {"config.json": b'{"version": "new"}', "weights.bin": b"n" * 7000, "extra.txt": b"only new"}


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_tree(folder: Path, content: dict[str, bytes]) -> None:
    for name, data in content.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_file_is_written_whole_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state.json"
    assert atomic_write_text(path, "ü 1\n") == path
    assert path.read_text(encoding="utf-8") == "ü 1\n"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert hidden(path.parent) == []


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_file(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert hidden(tmp_path) == []


def test_a_folder_is_replaced_whole_and_a_failed_build_changes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    with replacing_dir(dest) as build:
        write_tree(build, OLD)
    assert tree(dest) == OLD
    with pytest.raises(RuntimeError, match="out of memory"), replacing_dir(dest) as build:
        write_tree(build, NEW)
        raise RuntimeError("out of memory")
    assert tree(dest) == OLD
    with replacing_dir(dest) as build:
        write_tree(build, NEW)
    assert tree(dest) == NEW
    assert hidden(tmp_path) == []


def test_a_folder_built_elsewhere_on_the_same_file_system_replaces_dest(tmp_path: Path) -> None:
    dest, build = tmp_path / "sdk", tmp_path / "generator-output"
    write_tree(dest, OLD)
    write_tree(build, NEW)
    atomic_replace_dir(build, dest)
    assert tree(dest) == NEW and not build.exists()


def test_leftovers_of_dead_writers_go_and_those_of_live_ones_stay(tmp_path: Path) -> None:
    dead_file, dead_dir = tmp_path / ".a.pt.partial-0123456789ab", tmp_path / ".model.partial-ba9876543210"
    dead_file.write_bytes(b"half")
    write_tree(dead_dir, {"config.json": b"{"})
    live = tmp_path / ".b.pt.partial-aaaaaaaaaaaa"
    live.write_bytes(b"being written")
    unrelated = tmp_path / ".model.partial-notours"
    unrelated.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as its writer holds it
        atomic_write_text(tmp_path / "c.txt", "c")
        assert hidden(tmp_path) == sorted([live.name, unrelated.name])
    finally:
        os.close(fd)
    atomic_write_text(tmp_path / "c.txt", "c")
    assert hidden(tmp_path) == [unrelated.name]


def test_two_writers_in_one_folder_do_not_remove_each_others_work(tmp_path: Path) -> None:
    dest = tmp_path / "python"
    with replacing_dir(dest) as build:
        write_tree(build, NEW)
        atomic_write_text(tmp_path / "openapi.json", "{}")  # another writer cleans the folder meanwhile
        with replacing_dir(tmp_path / "java") as other:
            write_tree(other, OLD)
        assert tree(build) == NEW
    assert tree(dest) == NEW and tree(tmp_path / "java") == OLD


CHILD = textwrap.dedent(
    """
    import ast, errno, os, signal, sys
    from pathlib import Path
    from policy_server import files

    dest, kill_at, exchange = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "exchange"
    content = ast.literal_eval(sys.argv[4])
    if not exchange:  # as on a file system without RENAME_EXCHANGE
        def refuse(a, b):
            raise OSError(errno.EINVAL, "no exchange here")
        files._exchange = refuse

    def die(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    with files.replacing_dir(dest, die) as build:
        for i, (name, data) in enumerate(sorted(content.items())):
            (build / name).parent.mkdir(parents=True, exist_ok=True)
            (build / name).write_bytes(data)
            if i == 1:
                die("half written")
    print("survived", flush=True)
    """
)

EXCHANGE_STEPS = ["staged", "half written", "synced", "exchanged", "parent synced", "old removed"]
TWO_RENAME_STEPS = ["synced", "moved aside", "renamed", "parent synced", "old removed"]
FIRST_TIME_STEPS = ["staged", "half written", "synced", "renamed", "parent synced"]


def crash_at(dest: Path, step: str, exchange: bool) -> None:
    """Replace ``dest`` with NEW in a child process that SIGKILLs itself right after ``step``."""
    script = dest.parent / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(script), str(dest), step, "exchange" if exchange else "renames", repr(NEW)]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    script.unlink()
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr


@pytest.mark.parametrize("step", EXCHANGE_STEPS)
def test_a_writer_killed_at_any_step_leaves_the_old_folder_or_the_new(tmp_path: Path, step: str) -> None:
    dest = tmp_path / "cycle-00000003"
    write_tree(dest, OLD)
    crash_at(dest, step, exchange=True)
    assert tree(dest) in (OLD, NEW)
    assert tree(dest) == (NEW if EXCHANGE_STEPS.index(step) >= EXCHANGE_STEPS.index("exchanged") else OLD)
    with replacing_dir(dest) as build:  # the next writer cleans up after the dead one
        write_tree(build, {"config.json": b"next"})
    assert tree(dest) == {"config.json": b"next"}
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("step", FIRST_TIME_STEPS)
def test_a_writer_killed_before_a_first_folder_exists_leaves_none_or_the_new(
    tmp_path: Path, step: str
) -> None:
    dest = tmp_path / "adapter"
    crash_at(dest, step, exchange=True)
    renamed = FIRST_TIME_STEPS.index(step) >= FIRST_TIME_STEPS.index("renamed")
    assert dest.exists() == renamed
    if renamed:
        assert tree(dest) == NEW
    atomic_write_text(tmp_path / "other.txt", "x")
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("step", TWO_RENAME_STEPS)
def test_without_exchange_the_next_writer_repairs_a_crash_between_the_two_renames(
    tmp_path: Path, step: str
) -> None:
    dest = tmp_path / "value"
    write_tree(dest, OLD)
    crash_at(dest, step, exchange=False)
    assert dest.exists() == (step != "moved aside")
    atomic_write_text(tmp_path / "other.txt", "x")  # any helper call in the folder
    assert tree(dest) == (OLD if TWO_RENAME_STEPS.index(step) < TWO_RENAME_STEPS.index("renamed") else NEW)
    assert hidden(tmp_path) == []


def test_the_fallback_is_taken_only_for_errors_that_mean_no_exchange(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "model"
    write_tree(dest, OLD)

    def denied(a: Path, b: Path) -> None:
        raise OSError(errno.EACCES, "permission denied")

    monkeypatch.setattr(files, "_exchange", denied)
    with pytest.raises(PermissionError), replacing_dir(dest) as build:
        write_tree(build, NEW)
    assert tree(dest) == OLD and hidden(tmp_path) == []


def test_exchange_swaps_two_folders_in_place(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_tree(a, OLD)
    write_tree(b, NEW)
    files._exchange(a, b)
    assert tree(a) == NEW and tree(b) == OLD
