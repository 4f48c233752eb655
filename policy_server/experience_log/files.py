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
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

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
        self._writer = pq.ParquetWriter(self._partial, SCHEMA)

    def write(self, entries: Sequence[Entry]) -> None:
        self._writer.write_table(to_table(entries))  # one row group

    def size(self) -> int:
        return self._partial.stat().st_size

    def close(self) -> Path:
        self._writer.close()
        os.replace(self._partial, self.path)
        return self.path


class JsonlFile:
    def __init__(self, path: Path) -> None:
        self.path, self.opened = path, time.monotonic()
        self._file = path.open("a", encoding="utf-8")

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
    """Delete the oldest log files of ``folder`` until they hold at most ``max_bytes``, but never
    the newest; returns the deleted paths."""
    files = log_files(folder)
    sizes = {p: _size(p) for p in files}
    total, deleted = sum(sizes.values()), []
    for path in files[:-1]:
        if total <= max_bytes:
            break
        try:
            path.unlink()
        except FileNotFoundError:  # another process of the same folder deleted it first
            pass
        total -= sizes[path]
        deleted.append(path)
    return deleted


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --- reading ----------------------------------------------------------------------------------


def read_file(path: Path) -> Iterator[LogRecord]:
    """The records of one finished log file (a JSON lines file: up to its last whole line)."""
    if path.suffix == ".parquet":
        for row in pq.read_table(path, schema=SCHEMA).to_pylist():
            yield from_row(row)
        return
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if not line.endswith("\n"):
                return  # torn by a killed writer
            yield from_row(json.loads(line))


def read_log(folder: Path | str, policy: str | None = None) -> list[LogRecord]:
    """Every record of the readable files in ``folder`` (of ``policy`` only, when given), in file order.

    Raises FileNotFoundError when ``folder`` does not exist; a Parquet ``.tmp`` (open, or left by
    a killed writer) is skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no experience log folder {folder}")
    records = []
    for path in log_files(folder):
        if path.name.endswith(PARTIAL):
            continue
        try:
            records.extend(r for r in read_file(path) if policy is None or r.policy == policy)
        except (OSError, pa.ArrowException) as exc:  # deleted by retention meanwhile, or not ours
            log.warning("skipping %s: %s", path, exc)
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
