"""Where experience waits for an update: a rollout buffer (PPO) and a replay ring buffer (DQN)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from policy_server.training.experience import ExperienceBatch

_TRANSITION = ("obs", "actions", "rewards", "next_obs", "terminated")
_MASKS = ("masks", "next_masks")


class RolloutBuffer:
    """Batches in arrival order until an update takes them all."""

    def __init__(self) -> None:
        self._batches: list[ExperienceBatch] = []
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def add(self, batch: ExperienceBatch) -> None:
        if len(batch):
            self._batches.append(batch)
            self._rows += len(batch)

    def take(self) -> ExperienceBatch:
        """All rows in arrival order (each batch's last row ends a fragment); empties the buffer.

        Raises ValueError when the buffer is empty.
        """
        if not self._batches:
            raise ValueError("the rollout buffer is empty")
        batch = ExperienceBatch.concat(self._batches)
        self._batches, self._rows = [], 0
        return batch


class ReplayBuffer:
    """The newest ``capacity`` transitions ``(obs, action, reward, next_obs, terminated)``.

    A ring of numpy arrays; truncated transitions are stored with ``terminated`` false, so the
    TD target bootstraps them. With ``mask_width``, the legal actions at ``obs`` and ``next_obs``
    too (``masks``, ``next_masks``; a batch without them allows every action).
    """

    def __init__(
        self, capacity: int, obs_dim: int, action_dim: int = 1, action_dtype: type = np.int64, mask_width: int = 0
    ) -> None:
        self.capacity = capacity
        self.fields = _TRANSITION + (_MASKS if mask_width else ())
        if mask_width:
            self.masks = np.ones((capacity, mask_width), dtype=bool)
            self.next_masks = np.ones((capacity, mask_width), dtype=bool)
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, action_dim), dtype=action_dtype)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=bool)
        self._pos = 0  # where the next transition goes
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, batch: ExperienceBatch) -> None:
        rows = {name: getattr(batch, name) for name in _TRANSITION}
        for name in self.fields[len(_TRANSITION):]:
            given = getattr(batch, name)
            rows[name] = np.ones((len(batch), self.masks.shape[1]), dtype=bool) if given is None else given
        self._put(rows)

    def _fit(self, obs: np.ndarray) -> None:
        """Take the observations' shape and dtype (an image space's ``(84, 84, 4)`` uint8, say) while
        the buffer is empty; ``obs_dim`` float32 columns until then."""
        if obs.shape[1:] == self.obs.shape[1:] and obs.dtype == self.obs.dtype:
            return
        if self._size:
            raise ValueError(f"observations of shape {list(obs.shape[1:])} {obs.dtype} for a replay buffer of "
                             f"{list(self.obs.shape[1:])} {self.obs.dtype}")
        self.obs = np.zeros((self.capacity, *obs.shape[1:]), dtype=obs.dtype)
        self.next_obs = np.zeros_like(self.obs)

    def _put(self, rows: dict[str, np.ndarray]) -> None:
        self._fit(rows["obs"])
        n = len(rows["rewards"])
        if n > self.capacity:  # only the newest capacity rows would survive anyway
            rows, n = {k: v[-self.capacity :] for k, v in rows.items()}, self.capacity
        index = (self._pos + np.arange(n)) % self.capacity
        for name, values in rows.items():
            getattr(self, name)[index] = values
        self._pos = (self._pos + n) % self.capacity
        self._size = min(self._size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch_size`` transitions drawn uniformly with replacement, as CPU tensors.

        ``obs``, ``next_obs`` (B, *obs_shape) as stored; ``actions`` (B, action_dim); ``rewards``
        and ``terminated`` float32 (B,).
        """
        return self.rows(self.sample_index(batch_size, generator))

    def sample_index(self, batch_size: int, generator: torch.Generator) -> np.ndarray:
        """``(B,)`` slots drawn uniformly with replacement; raises ValueError when empty."""
        if not self._size:
            raise ValueError("the replay buffer is empty")
        return torch.randint(self._size, (batch_size,), generator=generator).numpy()

    def rows(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """The transitions in these slots, as ``sample`` gives them."""
        out = {name: torch.from_numpy(getattr(self, name)[index]) for name in self.fields}
        out["terminated"] = out["terminated"].float()
        return out

    def drop(self, index: np.ndarray) -> None:
        """Forget the transitions in these slots (the others keep their order)."""
        order = self._ordered()
        kept = order[~np.isin(order, index)]
        rows = {name: getattr(self, name)[kept] for name in self.fields}
        self._pos = self._size = 0
        self._put(rows)

    def _ordered(self) -> np.ndarray:
        """Indices of the stored transitions, oldest first."""
        start = self._pos if self._size == self.capacity else 0
        return (start + np.arange(self._size)) % self.capacity

    def state_dict(self) -> dict[str, Any]:
        """The stored transitions, oldest first, as tensors (loadable with ``weights_only``)."""
        order = self._ordered()
        return {name: torch.from_numpy(getattr(self, name)[order]) for name in self.fields}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the contents; a smaller capacity keeps the newest transitions."""
        self._pos = self._size = 0
        self._put({name: state[name].numpy() for name in self.fields if name in state})
