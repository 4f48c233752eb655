"""Queued tasks for x1's ``POST /forward`` + ``GET /forward/{task_id}``: results kept until fetched.

Fetched once, then forgotten: ``take`` hands out a finished (done or failed) task and removes it
in the same locked step, so of any number of fetches, however close together, exactly one gets
the result and the others a ``NotFound`` (404). The price: a result whose answer is lost on the
way to the client (a dropped connection) is gone; generate it again. ``get`` only reads.
What is never fetched expires: a pending task ``ttl_s`` after it was created, a finished one
``ttl_s`` after it finished. The store holds at most ``max_tasks`` tasks; beyond that ``create``
raises ``QueueFull`` (429).

Tasks live in memory, so a store that is created again (its replica's process died and Serve
started another) has lost them. Task ids start with their store's random ``incarnation``: an id
of another incarnation is answered ``TaskLost`` (410, "submit it again"), not a bare 404.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from policy_server.errors import Conflict, NotFound, PolicyServerError, QueueFull, TaskLost

TaskState = Literal["pending", "done", "failed"]
_INCARNATION = re.compile(r"[0-9a-f]{8}-[0-9a-f]{32}")  # the form of the ids a store hands out
Failure = PolicyServerError | str
"""Why a task failed: the error its fetcher gets (kept whole), or a message."""


@dataclass(frozen=True)
class TaskView:
    """A task as ``get`` sees it; ``result`` is set when done, ``error`` when failed."""

    task_id: str
    state: TaskState
    meta: Mapping[str, Any]
    result: Any = None
    error: Failure | None = None


@dataclass(frozen=True)
class TaskStats:
    pending: int
    done: int
    failed: int


@dataclass
class _Task:
    meta: Mapping[str, Any]
    expires_at: float
    state: TaskState = "pending"
    result: Any = None
    error: Failure | None = None


class TaskStore:
    """Thread-safe task table with expiry by an injectable monotonic ``clock``."""

    def __init__(
        self, ttl_s: float = 600.0, max_tasks: int = 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if ttl_s <= 0 or max_tasks < 1:
            raise ValueError(f"ttl_s must be > 0 and max_tasks >= 1, not {ttl_s}, {max_tasks}")
        self.ttl_s = ttl_s
        self.max_tasks = max_tasks
        self._clock = clock
        self.incarnation = uuid.uuid4().hex[:8]
        self._lock = threading.Lock()
        # Ordered by expiry: every write sets expires_at = now + ttl_s and moves the task to the end.
        self._tasks: OrderedDict[str, _Task] = OrderedDict()

    def create(self, meta: Mapping[str, Any] | None = None) -> str:
        """A new pending task; ``meta`` (the request, say) comes back with every ``get``."""
        with self._lock:
            now = self._purge()
            if len(self._tasks) >= self.max_tasks:
                raise QueueFull(
                    f"{len(self._tasks)} queued tasks are pending or waiting to be fetched "
                    f"(max_tasks={self.max_tasks}); fetch finished tasks or retry shortly"
                )
            task_id = f"{self.incarnation}-{uuid.uuid4().hex}"
            self._tasks[task_id] = _Task(dict(meta or {}), now + self.ttl_s)
            return task_id

    def complete(self, task_id: str, result: Any) -> None:
        """Store a pending task's result. Raises ``NotFound`` if it expired meanwhile."""
        self._finish(task_id, "done", result, None)

    def fail(self, task_id: str, error: Failure) -> None:
        """Mark a pending task failed; ``error`` is what the client gets."""
        self._finish(task_id, "failed", None, error)

    def get(self, task_id: str) -> TaskView:
        """The task's state and result, leaving it in place (``take`` is the fetch that forgets)."""
        with self._lock:
            self._purge()
            return self._view(task_id, self._require(task_id))

    def take(self, task_id: str) -> TaskView:
        """The task's state and result; a finished task is removed under the same lock hold, so it
        is handed out once. A pending task stays. Raises ``NotFound`` for an unknown, expired or
        already taken id."""
        with self._lock:
            self._purge()
            task = self._require(task_id)
            if task.state != "pending":
                del self._tasks[task_id]
            return self._view(task_id, task)

    def stats(self) -> TaskStats:
        with self._lock:
            self._purge()
            states = [task.state for task in self._tasks.values()]
            return TaskStats(states.count("pending"), states.count("done"), states.count("failed"))

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._tasks)

    def _finish(self, task_id: str, state: TaskState, result: Any, error: Failure | None) -> None:
        with self._lock:
            now = self._purge()
            task = self._require(task_id)
            if task.state != "pending":
                raise Conflict(f"task {task_id} is already {task.state}")
            task.state, task.result, task.error = state, result, error
            task.expires_at = now + self.ttl_s
            self._tasks.move_to_end(task_id)

    @staticmethod
    def _view(task_id: str, task: _Task) -> TaskView:
        return TaskView(task_id, task.state, task.meta, task.result, task.error)

    def _require(self, task_id: str) -> _Task:
        task = self._tasks.get(task_id)
        if task is None and _INCARNATION.fullmatch(task_id) and not task_id.startswith(f"{self.incarnation}-"):
            raise TaskLost(
                f"task {task_id!r} was queued on a replica that has since been replaced (its process "
                "died): the task and its result are lost; submit it again"
            )
        if task is None:
            raise NotFound(
                f"no task {task_id!r}: it never existed, its result was already fetched, or it expired "
                f"(results are kept {self.ttl_s:g} s after they are ready)"
            )
        return task

    def _purge(self) -> float:
        """Drop expired tasks (lock held); returns the current time."""
        now = self._clock()
        while self._tasks:
            task_id, task = next(iter(self._tasks.items()))
            if task.expires_at > now:
                break
            del self._tasks[task_id]
        return now
