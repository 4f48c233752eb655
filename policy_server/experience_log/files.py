"""The log's files: one open file per writer, rotated by size and age, the folder kept under a size.

Each file is readable on its own:

* **Parquet**: the open file is ``<name>.parquet.tmp``, one row group per flush; at rotation it
  is closed (Parquet writes its footer then) and renamed to ``<name>.parquet``. A killed server
  leaves every renamed file whole and a ``.tmp`` without a footer that readers skip: it loses at
  most one file's rows (``rotate_s`` seconds, ``max_file_mb``).
* **JSON lines**: the open file is ``<name>.jsonl`` itself, appended and flushed on each flush;
  a killed server leaves it readable up to its last whole line (readers skip a torn last line).

File names start with the policy and the UTC time the file was opened, then host, process and a
counter, so several gateway processes may share a folder and names sort by age.

**Sharing a folder.** A writer holds an ``flock`` on the file it has open, from creating it until
it is finished (a Parquet file: renamed; the lock is on the file, not its name, so it survives the
rename). Retention (``enforce_total``) deletes only files it can lock itself without waiting, so it
never deletes a file that any live process (this one, another, or another host's on a file system
with shared locks such as NFS) still writes; a killed writer's lock goes with it, so its leftover
``.tmp`` is deleted like any finished file. Readers take no lock: a file they have opened stays
readable when retention deletes it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from policy_server.experience_log.records import SCHEMA, Entry, LogRecord, from_row, to_lines, to_table

log = logging.getLogger(__name__)
Format = Literal["parquet", "jsonl"]
SUFFIXES = {"parquet": ".parquet", "jsonl": ".jsonl"}
PARTIAL = ".tmp"


class LogFile(Protocol):
    path: Path
    opened: float  # time.monotonic() at opening

    def write(self, entries: Sequence[Entry]) -> None: ...
    def size(self) -> int: ...
    def close(self) -> Path:
        """Finish the file; returns its final path."""
        ...


class ParquetFile:
    def __init__(self, path: Path) -> None:
        self.path, self.opened = path, time.monotonic()
        self._partial = path.with_name(path.name + PARTIAL)
        self._lock = create_held(self._partial, os.O_RDWR)
        try:
            self._writer = pq.ParquetWriter(self._partial, SCHEMA)  # opens the file the lock holds
        except BaseException:
            os.close(self._lock)
            raise

    def write(self, entries: Sequence[Entry]) -> None:
        self._writer.write_table(to_table(entries))  # one row group

    def size(self) -> int:
        return self._partial.stat().st_size

    def close(self) -> Path:
        try:
            self._writer.close()
            os.replace(self._partial, self.path)
        finally:
            os.close(self._lock)  # after the rename: an unlocked .tmp is a dead writer's, retention's to delete
        return self.path


class JsonlFile:
    def __init__(self, path: Path) -> None:
        self.path, self.opened = path, time.monotonic()
        self._file = os.fdopen(create_held(path, os.O_WRONLY | os.O_APPEND), "a", encoding="utf-8")  # closing unlocks

    def write(self, entries: Sequence[Entry]) -> None:
        self._file.write(to_lines(entries))
        self._file.flush()  # in the OS's hands: a killed process loses nothing written

    def size(self) -> int:
        return self._file.tell()

    def close(self) -> Path:
        self._file.close()
        return self.path


class FileNamer:
    """``<policy>-<UTC time>-<host>-<pid>-<n><suffix>`` in ``folder``."""

    def __init__(self, folder: Path, policy: str, fmt: Format) -> None:
        self.folder, self.policy, self.suffix = folder, policy, SUFFIXES[fmt]
        self._n = 0

    def next(self) -> Path:
        self._n += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        host = socket.gethostname().replace("-", "_")
        return self.folder / f"{self.policy}-{stamp}-{host}-{os.getpid()}-{self._n:06d}{self.suffix}"


def open_file(path: Path, fmt: Format) -> LogFile:
    return ParquetFile(path) if fmt == "parquet" else JsonlFile(path)


def log_files(folder: Path) -> list[Path]:
    """The finished-or-open log files of ``folder`` (Parquet's ``.tmp`` included), oldest first."""
    found = [p for p in folder.iterdir() if p.suffix in (".parquet", ".jsonl") or p.name.endswith(".parquet" + PARTIAL)]
    return sorted(found, key=lambda p: (_mtime(p), p.name))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # deleted meanwhile by another process's retention
        return 0.0


def enforce_total(folder: Path, max_bytes: int) -> list[Path]:
    """Delete the oldest log files of ``folder`` until they hold at most ``max_bytes`` (bytes), but
    never the newest nor one a live writer holds open (any process's, see the module): open files
    count towards the total and stay, so the folder exceeds ``max_bytes`` by at most its open files.
    Returns the deleted paths (also those another process deleted first)."""
    files = log_files(folder)
    sizes = {p: _size(p) for p in files}
    total, deleted = sum(sizes.values()), []
    for path in files[:-1]:
        if total <= max_bytes:
            break
        if delete_unless_held(path):
            total -= sizes[path]
            deleted.append(path)
    return deleted


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --- locks: the stdlib's flock(2) is all this needs (a lock dies with its process), no library ------

_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}  # a file system without flock (NFSv3 without lockd)


def create_held(path: Path, flags: int) -> int:
    """Open ``path`` (created when missing) with ``flags`` and hold a shared lock on it until the
    returned descriptor is closed. Raises OSError as ``os.open`` does.

    Retention may delete a new file between its creation and the lock; the lock is then on a file
    without a name, and the open is retried, so the lock always holds the file ``path`` names.
    Where the file system has no locks the file is written unlocked (as before locks were used)."""
    while True:
        fd = os.open(path, flags | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                return fd
            os.close(fd)
            raise
        if _names(path, fd):
            return fd
        os.close(fd)


def delete_unless_held(path: Path) -> bool:
    """Delete the log file ``path`` unless a live writer holds its lock (never waiting for one); True
    when the file is gone (deleted here or by another process), False when it stays.

    A file this process cannot open is kept; where the file system has no locks it is deleted."""
    try:
        fd = os.open(path, os.O_RDWR)  # NFS emulates flock with fcntl locks: LOCK_EX needs a writable descriptor
    except FileNotFoundError:
        return True  # another process of the same folder deleted it first
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer's open file
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                return False
        if _names(path, fd):
            path.unlink(missing_ok=True)
            return True
        return os.fstat(fd).st_nlink == 0  # deleted meanwhile; else renamed (a .tmp its writer finished)
    finally:
        os.close(fd)


def _names(path: Path, fd: int) -> bool:
    """``path`` still names the file open as ``fd``."""
    try:
        found, held = path.stat(), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


# --- reading ----------------------------------------------------------------------------------


def read_file(path: Path) -> list[LogRecord]:
    """The records of one finished log file (a JSON lines file: up to its last whole line).

    Raises FileNotFoundError when it is gone (retention deleted it), pyarrow's errors when it is no
    Parquet file of this log."""
    with path.open("rb") as f:  # once: pyarrow given a path opens it twice, and a deletion between loses it
        return read_records(f, path.suffix)


def read_records(f: BinaryIO, suffix: str) -> list[LogRecord]:
    """The records of the log file open as ``f`` (``suffix`` ``.parquet`` or ``.jsonl``); it reads
    whole even when the file is deleted meanwhile."""
    if suffix == ".parquet":
        return [from_row(row) for row in pq.read_table(f, schema=SCHEMA).to_pylist()]
    records = []
    for line in f:
        if not line.endswith(b"\n"):
            break  # torn by a killed writer, or being written now
        records.append(from_row(json.loads(line)))
    return records


def read_log(folder: Path | str, policy: str | None = None) -> list[LogRecord]:
    """Every record of the readable files in ``folder`` (of ``policy`` only, when given), in file order.

    Raises FileNotFoundError when ``folder`` does not exist; a Parquet ``.tmp`` (open, or left by
    a killed writer) is skipped, and so is a file deleted by retention before it could be opened
    (one opened is read whole)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no experience log folder {folder}")
    records = []
    for path in log_files(folder):
        if path.name.endswith(PARTIAL):
            continue
        try:
            found = read_file(path)
        except FileNotFoundError:
            log.info("%s was deleted by the log's retention while the log was read", path)
            continue
        except (OSError, pa.ArrowException) as exc:  # not ours
            log.warning("skipping %s: %s", path, exc)
            continue
        records.extend(r for r in found if policy is None or r.policy == policy)
    return records


def load_spaces(folder: Path, policy: str | None) -> dict[str, Any]:
    """The ``<policy>.spaces.json`` of ``folder`` (``policy`` None: the folder's only one).

    Raises FileNotFoundError when there is none, ValueError when ``policy`` is needed to choose."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no experience log folder {folder}")
    found = {p.name.removesuffix(".spaces.json"): p for p in sorted(folder.glob("*.spaces.json"))}
    if not found:
        raise FileNotFoundError(f"{folder} holds no <policy>.spaces.json: no server has logged there")
    if policy is None:
        if len(found) != 1:
            raise ValueError(f"{folder} logs the policies {sorted(found)}: name one (--policy)")
        policy = next(iter(found))
    if policy not in found:
        raise FileNotFoundError(f"{folder} has no {policy}.spaces.json: no server logged policy {policy!r} there")
    doc: dict[str, Any] = json.loads(found[policy].read_text(encoding="utf-8"))
    return doc
