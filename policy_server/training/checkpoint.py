"""Checkpoints of a learner's state on disk: atomic writes, safe loads, pruned periodic saves.

One file ``<name>.pt`` per checkpoint in one folder. A save writes a hidden temporary file in
that folder, syncs it and renames it over the final name, so a crash never leaves a partial
file under a checkpoint's name. Loads use ``torch.load(weights_only=True)``: a checkpoint holds
only tensors, numbers, strings, bools, None, lists, tuples and dicts, never arbitrary pickles.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any

import torch

from policy_server.errors import InvalidRequest, NotFound, summary
from policy_server.files import atomic_file, clean_leftovers

SUFFIX = ".pt"
NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$"  # no leading dot: hidden and '..'
_NAME = re.compile(NAME_PATTERN.strip("^$"))
_PERIODIC = re.compile(r"update-\d{8}")
_PLAIN = (torch.Tensor, int, float, str, bool, type(None))
log = logging.getLogger(__name__)


def periodic_name(updates: int) -> str:
    """The name of the periodic checkpoint after ``updates`` updates (pruned to the newest few)."""
    return f"update-{updates:08d}"


class CheckpointStore:
    """Named checkpoints in ``root``; only the newest ``keep`` periodic ones are kept.

    Opening a store removes the temporary files of saves that a killed process left half-written.
    """

    def __init__(self, root: Path, keep: int) -> None:
        self.root, self.keep = Path(root), keep
        if cleaned := clean_leftovers(self.root):
            log.info("removed %d temporary file(s) of interrupted checkpoint saves in %s", cleaned, self.root)

    def path(self, name: str) -> Path:
        """The file of checkpoint ``name``; raises InvalidRequest for a name that is not plain."""
        if not _NAME.fullmatch(name):
            raise InvalidRequest.at(
                "checkpoint",
                f"invalid checkpoint name {name!r}: use up to 128 letters, digits, '-', '_' and '.', "
                "not starting with '.'",
            )
        return self.root / f"{name}{SUFFIX}"

    def save(self, name: str, state: dict[str, Any]) -> Path:
        """Write ``state`` atomically under ``name``; a failed save leaves the previous one intact.

        Raises TypeError, writing nothing, when ``state`` holds something ``weights_only`` loads
        would refuse (numpy arrays, objects), naming where.
        """
        path = self.path(name)
        _check_plain(state, "state")
        with atomic_file(path) as f:
            torch.save(state, f)
            f.flush()
            # the kernel stamps files from a coarse clock (ms): saves in a row could tie
            now = time.time_ns()
            os.utime(f.fileno(), ns=(now, now))
        if _PERIODIC.fullmatch(name):
            self._prune()
        return path

    def load(self, name: str) -> dict[str, Any]:
        """The state saved under ``name`` (tensors on the CPU).

        Raises NotFound when there is none, InvalidRequest when the file holds anything but
        plain data (weights-only loading refuses it) or is not a checkpoint.
        """
        path = self.path(name)
        if not path.is_file():
            raise NotFound(f"no checkpoint {name!r}; list them to see which exist")  # not the server's folders
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise InvalidRequest.at(
                "checkpoint",
                f"checkpoint {name!r} cannot be loaded safely: {path} holds objects other than tensors "
                "and plain data, or is not a checkpoint; only files this store wrote can be loaded",
            ) from e
        except (RuntimeError, EOFError) as e:
            raise InvalidRequest.at(
                "checkpoint", f"checkpoint {name!r} is not a readable checkpoint file: {summary(e)}"
            ) from e

    def list(self) -> list[dict[str, Any]]:
        """``{name, bytes, modified}`` of every checkpoint, newest first (``modified``: unix time)."""
        entries = []
        for path in self.root.glob(f"*{SUFFIX}"):
            name = path.name[: -len(SUFFIX)]
            try:
                st = path.stat()
            except FileNotFoundError:  # pruned meanwhile
                continue
            if _NAME.fullmatch(name):
                entries.append((st.st_mtime_ns, name, st.st_size))
        entries.sort(reverse=True)
        return [{"name": n, "bytes": size, "modified": ns / 1e9} for ns, n, size in entries]

    def latest(self) -> str | None:
        """The name of the most recently written checkpoint, or None."""
        entries = self.list()
        return entries[0]["name"] if entries else None

    def _prune(self) -> None:
        """Delete all but the ``keep`` most recently written periodic checkpoints."""
        periodic = [e["name"] for e in self.list() if _PERIODIC.fullmatch(e["name"])]
        for name in periodic[self.keep :]:
            self.path(name).unlink(missing_ok=True)


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; checkpoint keys are str or int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}.{i}")
    elif not isinstance(value, _PLAIN):
        raise TypeError(
            f"{where} is a {type(value).__name__}; a checkpoint holds only tensors, numbers, strings, "
            "bools, None, lists and dicts (store arrays as tensors)"
        )
