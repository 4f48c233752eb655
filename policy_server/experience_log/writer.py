"""``ExperienceLog``: served decisions and outcomes to rotating files, off the request path.

The request path only puts an entry (references to arrays it no longer changes) on a bounded
queue, without waiting: when the queue is full the entry is dropped and counted. One writer
thread turns entries into rows and writes them every ``flush_s``; a failing disk is logged and
counted, never raised to a request.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any, Literal

import pyarrow as pa

from policy_server.experience_log.files import FileNamer, LogFile, enforce_total, open_file
from policy_server.experience_log.records import Entry
from policy_server.files import atomic_write_text
from policy_server.schema.experience_log import ExperienceLogSpec

log = logging.getLogger(__name__)
DropReason = Literal["queue_full", "write_error"]
MIB = 1024 * 1024
ERROR_LOG_INTERVAL_S = 60.0


class LogCounters:
    """Hooks the log reports through; this base reports nowhere (the gateway's reports to Prometheus)."""

    def written(self, rows: int) -> None: ...
    def dropped(self, reason: DropReason, rows: int) -> None: ...


class ExperienceLog:
    """The experience log of one policy; ``open`` starts its writer thread, ``close`` flushes and stops it."""

    def __init__(self, spec: ExperienceLogSpec, policy: str, spaces: dict[str, Any] | None = None,
                 counters: LogCounters | None = None) -> None:
        self.spec, self.policy, self.spaces = spec, policy, spaces
        self.counters = counters or LogCounters()
        self.written = 0
        self.dropped: dict[DropReason, int] = {"queue_full": 0, "write_error": 0}
        self._queue: queue.Queue[Any] = queue.Queue(spec.queue_size)  # entries; None stops the writer
        self._namer = FileNamer(spec.path, policy, spec.format)
        self._file: LogFile | None = None
        self._thread: threading.Thread | None = None
        self._last_error_log = -ERROR_LOG_INTERVAL_S

    def open(self) -> None:
        """Create the folder, write the policy's spaces beside the files, start the writer (a folder
        that cannot be made is logged; its rows are then counted as write errors)."""
        pa.array([0])  # pyarrow imports pandas on its first array (seconds here): now, not in the first flush
        try:
            self.spec.path.mkdir(parents=True, exist_ok=True)
            if self.spaces is not None:
                # a temporary of its own (not ``<name>.<pid>.tmp``: gateways in containers on other hosts share pids)
                atomic_write_text(self.spec.path / f"{self.policy}.spaces.json", json.dumps(self.spaces))
        except OSError as exc:
            self._disk_error(exc)
        self._thread = threading.Thread(target=self._run, name=f"experience-log-{self.policy}", daemon=True)
        self._thread.start()

    def submit(self, entry: Entry) -> None:
        """Queue ``entry`` for the writer; never blocks nor raises (a full queue drops it, counted)."""
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._drop("queue_full", len(entry))

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, finish the open file, stop the writer."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout_s)  # waits for room: the writer drains the queue
        except queue.Full:
            log.error("experience log of policy %r: the writer did not drain its queue in %g s", self.policy, timeout_s)
        self._thread.join(timeout_s)
        self._thread = None

    # --- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        pending: list[Entry] = []
        due = time.monotonic() + self.spec.flush_s
        while True:
            try:
                entry = self._queue.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                entry = _TICK
            if entry is None:
                break
            if entry is not _TICK:
                pending.append(entry)
            if time.monotonic() >= due:
                self._write(pending)
                pending, due = [], time.monotonic() + self.spec.flush_s
        self._write(pending)
        self._finish_file()

    def _write(self, entries: list[Entry]) -> None:
        rows = sum(len(e) for e in entries)
        try:
            if self._file is not None and self._rotation_due(self._file):
                self._finish_file()
            if rows:
                if self._file is None:
                    self._file = open_file(self._namer.next(), self.spec.format)
                self._file.write(entries)
                self.written += rows
                self.counters.written(rows)
        except (OSError, pa.ArrowException, ValueError) as exc:  # a bad row, too, must not end the writer
            self._disk_error(exc)
            self._drop("write_error", rows)
            self._abandon_file()

    def _rotation_due(self, file: LogFile) -> bool:
        return file.size() >= self.spec.max_file_mb * MIB or time.monotonic() - file.opened >= self.spec.rotate_s

    def _finish_file(self) -> None:
        file, self._file = self._file, None
        try:
            if file is not None:
                file.close()
            enforce_total(self.spec.path, int(self.spec.max_total_mb * MIB))
        except OSError as exc:
            self._disk_error(exc)

    def _abandon_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except (OSError, pa.ArrowException):  # the disk that failed the write: its error is logged already
                pass

    def _drop(self, reason: DropReason, rows: int) -> None:
        if rows:
            self.dropped[reason] += rows
            self.counters.dropped(reason, rows)

    def _disk_error(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:  # a full disk fails every flush
            self._last_error_log = now
            log.error("experience log of policy %r cannot write to %s: %s (rows are dropped and counted)",
                      self.policy, self.spec.path, exc)


_TICK: Any = object()  # the flush timer ran out with nothing queued
