"""Training telemetry: clients, episode returns, the best moving average, samples per second.

Plain bookkeeping with an injectable clock; the trainer holds one and guards it with its lock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ClientRecord:
    last_seen: float
    samples: int = 0
    episodes: int = 0
    last_return: float | None = None
    running_return: float = 0.0  # of the episode in progress
    info: dict[str, Any] = field(default_factory=dict)


class Telemetry:
    """Tracks what clients report; ``record_steps`` returns True when the best average improved."""

    def __init__(self, window: int, client_timeout_s: float, clock: Callable[[], float], rate_window_s: float = 10.0) -> None:
        self.window, self.client_timeout_s, self.clock = window, client_timeout_s, clock
        self.rate_window_s = rate_window_s
        self.clients: dict[str, ClientRecord] = {}
        self.returns: deque[float] = deque(maxlen=window)
        self.episodes = 0
        self.best_mean_return: float | None = None
        self._arrivals: deque[tuple[float, int]] = deque()

    def seen(self, client_id: str, info: dict[str, Any] | None = None) -> ClientRecord:
        now = self.clock()
        record = self.clients.get(client_id)
        if record is None:
            record = self.clients[client_id] = ClientRecord(last_seen=now)
        record.last_seen = now
        if info:
            record.info = dict(info)
        return record

    def record_steps(self, client_id: str, rewards: np.ndarray, episode_end: np.ndarray) -> bool:
        """Add a client's steps in order: their rewards build its episode returns."""
        record = self.seen(client_id)
        record.samples += len(rewards)
        self._arrivals.append((self.clock(), len(rewards)))
        start = 0
        # float64: a few float32 rewards near float32's max sum to more than it holds
        for end in np.flatnonzero(episode_end):
            record.running_return += float(rewards[start : end + 1].sum(dtype=np.float64))
            self._finish_episode(record)
            start = end + 1
        record.running_return += float(rewards[start:].sum(dtype=np.float64))
        return self._improved_best()

    def _finish_episode(self, record: ClientRecord) -> None:
        record.last_return, record.running_return = record.running_return, 0.0
        record.episodes += 1
        self.episodes += 1
        self.returns.append(record.last_return)

    def _improved_best(self) -> bool:
        mean = self.mean_return
        if mean is None or len(self.returns) < self.window:
            return False
        if self.best_mean_return is None or mean > self.best_mean_return:
            self.best_mean_return = mean
            return True
        return False

    @property
    def mean_return(self) -> float | None:
        return float(np.mean(self.returns)) if self.returns else None

    @property
    def last_return(self) -> float | None:
        return self.returns[-1] if self.returns else None

    def active_clients(self) -> int:
        now = self.clock()
        return sum(now - c.last_seen <= self.client_timeout_s for c in self.clients.values())

    def samples_per_second(self) -> float:
        now = self.clock()
        while self._arrivals and now - self._arrivals[0][0] > self.rate_window_s:
            self._arrivals.popleft()
        if not self._arrivals:
            return 0.0
        span = max(now - self._arrivals[0][0], 1.0)
        return sum(n for _, n in self._arrivals) / span

    def describe(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "active_clients": self.active_clients(),
            "clients": {
                cid: {
                    "last_seen_s": round(now - c.last_seen, 3),
                    "episodes": c.episodes,
                    "last_return": c.last_return,
                    "samples": c.samples,
                }
                for cid, c in self.clients.items()
            },
            "episodes": self.episodes,
            "last_return": self.last_return,
            "mean_return": self.mean_return,
            "best_mean_return": self.best_mean_return,
            "return_window": self.window,
            "recent_returns": list(self.returns),
            "samples_per_second": round(self.samples_per_second(), 1),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"returns": list(self.returns), "episodes": self.episodes, "best_mean_return": self.best_mean_return}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.returns = deque((float(r) for r in state["returns"]), maxlen=self.window)
        self.episodes = int(state["episodes"])
        best = state["best_mean_return"]
        self.best_mean_return = None if best is None or math.isnan(best) else float(best)
