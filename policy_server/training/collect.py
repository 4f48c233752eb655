"""Steps from acting calls: Pathmind's ``/collect_experience`` protocol, paired up per client.

A Pathmind-style client sends, for each environment step, the observation it now sees with the
reward and ``done`` flag of its previous action, and gets the next action back. The server pairs
each call with the same client's previous one: that call's ``obs``, ``action``, ``log_prob`` and
``model_version``, with this call's ``reward``, ``done`` and observation as ``next_obs``, make one
step. ``done`` ends the episode as terminated; the next call starts a new episode (its reward is
not part of any step).

A client's steps are handed to the trainer as one fragment (so advantages flow along the
episode) when its episode ends, when the fragment holds ``fragment_steps`` steps, when its next
step was acted by another model version, or when the client has been silent for ``expiry_s``
(or is the least recently seen of more than ``max_clients``); a cut fragment bootstraps from its
last ``next_obs``. A call's pending step (obs and action without their reward) dies with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from policy_server.training.experience import ExperienceBatch


@dataclass(frozen=True)
class Acted:
    """What one call acted: obs (*obs_shape,) as the model reads it, action int64 (k,) or float32
    (d,), and the legal actions at obs, bool (mask_width,) (None: every action)."""

    obs: np.ndarray
    action: np.ndarray
    log_prob: float
    version: int
    mask: np.ndarray | None = None


@dataclass
class _Client:
    last_seen: float
    pending: Acted | None = None
    steps: list[tuple[Acted, float, Acted]] = field(default_factory=list)  # (acted, reward, next call)
    terminated: bool = False  # the last step ended the episode


class StepCollector:
    """Per-client pending steps and fragments, bounded in clients and time. Not thread-safe: the
    trainer calls it under its lock."""

    def __init__(
        self, clock: Callable[[], float], expiry_s: float = 600.0, max_clients: int = 1024, fragment_steps: int = 128
    ) -> None:
        self.clock, self.expiry_s = clock, expiry_s
        self.max_clients, self.fragment_steps = max_clients, fragment_steps
        self._clients: dict[str, _Client] = {}  # least recently seen first

    def __len__(self) -> int:
        return len(self._clients)

    def step(self, client_id: str, acted: Acted, reward: float, done: bool) -> list[ExperienceBatch]:
        """Record one call of ``client_id``; returns the fragments it completed, oldest first."""
        now = self.clock()
        ready = self._expire(now)
        client = self._clients.pop(client_id, None) or _Client(now)
        client.last_seen = now
        if client.pending is not None:
            previous = client.pending
            if client.steps and client.steps[-1][0].version != previous.version:
                ready.append(_fragment(client_id, client))
            client.steps.append((previous, reward, acted))
            client.terminated = done
        client.pending = None if done else acted
        if client.steps and (done or len(client.steps) >= self.fragment_steps):
            ready.append(_fragment(client_id, client))
        if client.pending is not None or client.steps:
            self._clients[client_id] = client
        while len(self._clients) > self.max_clients:
            ready.extend(self._drop(next(iter(self._clients))))
        return ready

    def _expire(self, now: float) -> list[ExperienceBatch]:
        silent = [cid for cid, c in self._clients.items() if now - c.last_seen > self.expiry_s]
        return [batch for cid in silent for batch in self._drop(cid)]

    def _drop(self, client_id: str) -> list[ExperienceBatch]:
        client = self._clients.pop(client_id)
        return [_fragment(client_id, client)] if client.steps else []


def _fragment(client_id: str, client: _Client) -> ExperienceBatch:
    """The client's steps as one fragment (its last row ends it); empties them."""
    steps, client.steps = client.steps, []
    n = len(steps)
    last = np.zeros(n, dtype=bool)
    last[-1] = True
    terminated, client.terminated = client.terminated, False
    masked = any(a.mask is not None or b.mask is not None for a, _, b in steps)
    return ExperienceBatch(
        obs=np.stack([a.obs for a, _, _ in steps]),
        next_obs=np.stack([b.obs for _, _, b in steps]),
        actions=np.stack([a.action for a, _, _ in steps]),
        rewards=np.array([r for _, r, _ in steps], dtype=np.float32),
        terminated=last & terminated,
        truncated=np.zeros(n, dtype=bool),
        segment_end=last,
        log_probs=np.array([a.log_prob for a, _, _ in steps], dtype=np.float32),
        versions=np.array([a.version for a, _, _ in steps], dtype=np.int64),
        client_id=client_id,
        masks=_stack_masks([a for a, _, _ in steps]) if masked else None,
        next_masks=_stack_masks([b for _, _, b in steps]) if masked else None,
    )


def _stack_masks(acted: list[Acted]) -> np.ndarray:
    """The calls' masks as bool ``(N, W)``; a call without one allows every action."""
    width = next(a.mask.shape[0] for a in acted if a.mask is not None) if any(a.mask is not None for a in acted) else 0
    return np.stack([np.ones(width, dtype=bool) if a.mask is None else a.mask for a in acted])
