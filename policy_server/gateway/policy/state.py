"""A recurrent policy's state between requests: carried by the client, or kept here per episode id.

Each row of a recurrent request starts from one state: the ``state`` it carries (as RLlib's policy
server took it), else the state this gateway kept for its ``episode_id`` (``EpisodeStates``), else
the zero state (an episode's start; ``episode_start: true`` forces it). The answer carries the new
state, and the store keeps it under the episode id. The store lives in the gateway, not in a
replica: the state travels with the rows (``policies.recurrent``), so any replica answers any step.
With several gateway processes, route an episode's requests to one of them (or let the client
carry the state).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from policy_server.gateway.policy.service import Mode, PolicyService
from policy_server.gateway.policy.versions import Variant
from policy_server.policies.recurrent import StateLayout, state_answer, state_rows
from policy_server.policies.spaces import ActionSample
from policy_server.schema.recurrent import RecurrentSpec


class EpisodeStates:
    """Packed states ``(width,)`` by episode id: at most ``max_episodes`` (least recently used
    dropped first), each forgotten ``ttl_s`` seconds after its last use. Our own small LRU (an
    ``OrderedDict``): cachetools' TTLCache would do, but it is not a dependency here."""

    def __init__(self, ttl_s: float, max_episodes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_episodes, self.clock = ttl_s, max_episodes, clock
        self._states: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def get(self, episode_id: str) -> np.ndarray | None:
        """The episode's state, or None when the id is unknown, was dropped or has expired."""
        kept = self._states.get(episode_id)
        if kept is None:
            return None
        if self.clock() - kept[1] > self.ttl_s:
            del self._states[episode_id]
            return None
        return kept[0]

    def put(self, episode_id: str, state: np.ndarray) -> None:
        self._states[episode_id] = (state, self.clock())
        self._states.move_to_end(episode_id)
        now = self.clock()
        while self._states:  # the oldest first: drop the expired ones and any beyond the bound
            oldest, (_, used) = next(iter(self._states.items()))
            if len(self._states) <= self.max_episodes and now - used <= self.ttl_s:
                break
            del self._states[oldest]


@dataclass(frozen=True)
class Step:
    """What one row of a recurrent request says about its state."""

    state: dict[str, Any] | None = None
    episode_id: str | None = None
    episode_start: bool = False


class RecurrentService:
    """Acting for a recurrent policy: rows start from their step's state and answer the new one."""

    def __init__(self, service: PolicyService, layout: StateLayout, spec: RecurrentSpec,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.service, self.layout = service, layout
        self.episodes = EpisodeStates(spec.state_ttl_s, spec.max_episodes, clock)

    def start_states(self, steps: Sequence[Step], where: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Packed start states ``(B, width)`` of the rows, and per row whether it asked for a kept
        episode's state the store did not have (unknown or expired id: started from zero). Raises
        InvalidRequest naming each carried state of the wrong shape."""
        packed, _ = state_rows(self.layout, [s.state for s in steps], list(where))
        reset = [False] * len(steps)
        for i, step in enumerate(steps):
            if step.episode_start:
                packed[i] = 0.0
            elif step.state is None and step.episode_id is not None:
                kept = self.episodes.get(step.episode_id)
                if kept is None:
                    reset[i] = True
                else:
                    packed[i] = kept
        return packed, reset

    async def forward(
        self, obs: np.ndarray, steps: Sequence[Step], where: Sequence[str], policy_id: str | None = None,
        forced: Variant | None = None,
    ) -> tuple[list[np.ndarray], list[dict[str, Any]], int, Variant]:
        """The action heads for float32 ``(B, obs_dim)`` rows, each from its step's state; per row
        what the answer adds (``state``, ``state_reset``); the model version and the variant. Keeps
        each row's new state under its episode id. Raises as ``PolicyService.forward``."""
        start, reset = self.start_states(steps, where)
        out, variant = await self.service.forward(np.concatenate([obs, start], axis=1), where, policy_id, forced)
        k = len(self.layout.shapes)
        new_state = np.concatenate(out.heads[-k:], axis=1)
        for step, row in zip(steps, new_state, strict=True):
            if step.episode_id is not None:
                self.episodes.put(step.episode_id, row.copy())
        answers = [{"state": s, "state_reset": r} for s, r in zip(state_answer(self.layout, new_state), reset, strict=True)]
        return out.heads[:-k], answers, out.version, variant

    async def act(
        self, obs: np.ndarray, steps: Sequence[Step], mode: Mode, where: Sequence[str],
        policy_id: str | None = None, forced: Variant | None = None, mask: np.ndarray | None = None,
        mask_at: Sequence[str] | None = None,
    ) -> tuple[list[ActionSample], list[dict[str, Any]], int, Variant]:
        """As ``PolicyService.act``: never a masked action (``mask`` bool ``(B, mask_width)``; the
        log-prob is the masked distribution's); a mask that allows no action is refused before the
        model runs, so it advances no episode's state."""
        self.service.check_mask(mask, where, mask_at)
        heads, answers, version, variant = await self.forward(obs, steps, where, policy_id, forced)
        space, rng = self.service.policy.space, self.service.rng
        samples = space.sample(heads, rng, mask) if mode == "sample" else space.mode(heads, mask)
        return samples, answers, version, variant

    async def distribution(
        self, obs: np.ndarray, steps: Sequence[Step], where: Sequence[str], policy_id: str | None = None,
        forced: Variant | None = None, mask: np.ndarray | None = None, mask_at: Sequence[str] | None = None,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int, Variant]:
        """The exact distributions (masked actions: probability 0); raises as ``act``."""
        self.service.check_mask(mask, where, mask_at)
        heads, answers, version, variant = await self.forward(obs, steps, where, policy_id, forced)
        return self.service.policy.space.distribution(heads, mask), answers, version, variant
