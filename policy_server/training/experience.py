"""Experience as the trainers take it: validated numpy arrays, one row per environment step.

The gateway turns each request into one ``ExperienceBatch`` after validating every field, so a
malformed sample never reaches a buffer. Rows keep the order in which the client stepped; a row
with ``segment_end`` set is the last of a contiguous piece (an episode fragment): advantages do
not flow back across it, while ``next_obs`` still bootstraps a fragment that did not terminate.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

_MASKS = ("masks", "next_masks")


@dataclass(frozen=True)
class ExperienceBatch:
    """``N`` steps of one client.

    obs, next_obs   (N, *obs_shape) of the model input's dtype: float32 (N, obs_dim) but for a Box
                    observation space (uint8 (N, 84, 84, 4) images, say)
    actions         int64 (N, k) for discrete (k = 1) and tuple actions; float32 (N, d) for a box
    rewards         float32 (N,)
    terminated      bool (N,)   the episode ended in a terminal state (no bootstrap)
    truncated       bool (N,)   the episode was cut (time limit): bootstrap from next_obs
    segment_end     bool (N,)   last row of a contiguous fragment (always set where an episode ends)
    log_probs       float32 (N,) log-probability of the action under the acting model; NaN unknown
    versions        int64 (N,)  model version that chose the action
    masks           bool (N, W) the legal actions at ``obs`` (W: the space's ``mask_width``), or None
    next_masks      bool (N, W) the legal actions at ``next_obs`` (DQN's TD target), or None
    """

    obs: np.ndarray
    next_obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    segment_end: np.ndarray
    log_probs: np.ndarray
    versions: np.ndarray
    client_id: str = ""
    masks: np.ndarray | None = None
    next_masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rewards)

    def select(self, mask: np.ndarray) -> ExperienceBatch:
        """The rows where ``mask`` is true. A fragment cut by the mask ends where it is cut."""
        mask = np.asarray(mask, dtype=bool)
        ends = self.segment_end.copy()
        # a kept row whose successor is dropped ends its piece
        ends[:-1] |= mask[:-1] & ~mask[1:]
        arrays = _arrays(self)
        arrays["segment_end"] = ends
        return ExperienceBatch(**{k: v[mask] for k, v in arrays.items()}, client_id=self.client_id)

    @staticmethod
    def concat(batches: list[ExperienceBatch]) -> ExperienceBatch:
        """Rows of all batches in order; each batch's last row ends its piece."""
        if not batches:
            raise ValueError("nothing to concatenate")
        parts = {n: [getattr(b, n) for b in batches] for n in _arrays(batches[0]) if n not in _MASKS}
        for name in _MASKS:  # a batch without masks allows every action
            width = next((getattr(b, name).shape[1] for b in batches if getattr(b, name) is not None), None)
            if width is not None:
                parts[name] = [_all_allowed(b, name, width) for b in batches]
        ends = [b.segment_end.copy() for b in batches]
        for e in ends:
            if len(e):
                e[-1] = True
        parts["segment_end"] = ends
        return ExperienceBatch(**{n: np.concatenate(v) for n, v in parts.items()})

    @property
    def episode_end(self) -> np.ndarray:
        return self.terminated | self.truncated


def _arrays(batch: ExperienceBatch) -> dict[str, np.ndarray]:
    """The batch's arrays by field name (not its client id, nor masks it has not got)."""
    return {f.name: getattr(batch, f.name) for f in fields(batch)
            if f.name != "client_id" and getattr(batch, f.name) is not None}


def _all_allowed(batch: ExperienceBatch, name: str, width: int) -> np.ndarray:
    mask = getattr(batch, name)
    return np.ones((len(batch), width), dtype=bool) if mask is None else mask
