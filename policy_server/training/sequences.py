"""PPO for recurrent policies: the new log-probs come from re-running the model over sequences.

As sb3-contrib's ``RecurrentPPO`` (``sb3_contrib/common/recurrent/buffers.py``: sequences cut at
episode starts, padded, each starting from the LSTM state stored at its first step) and RLlib's
``max_seq_len`` chunks do: truncated backpropagation through time over fixed-length chunks.

Experience rows of a recurrent policy are its model-input rows (``policies.recurrent``): ``obs``
is ``[observation | state the step started from]`` and ``next_obs`` ``[next observation | state
after the step]``, in the client's step order. Each fragment (rows up to ``segment_end`` or an
episode's end) is cut into chunks of at most ``bptt_steps`` rows; a chunk starts from the state
stored in its first row, and within it the state is recomputed by the model being trained, so the
gradient flows back through the chunk's steps. The critic is a feed-forward network on the packed
row: it sees the actor's (stored) state, which is what remembers the episode so far.
"""

from __future__ import annotations

import numpy as np
import torch

from policy_server.policies.recurrent import StateLayout
from policy_server.policies.spaces import ActionSpace
from policy_server.schema.training import PPOConfig
from policy_server.training.distributions import as_heads, log_prob_entropy
from policy_server.training.experience import ExperienceBatch
from policy_server.training.ppo import PPOLearner


def sequence_chunks(ends: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``0..N-1`` in fragments that end where ``ends`` ``(N,)`` is set (and at ``N-1``), cut
    into chunks of at most ``length`` rows: the row index ``(C, length)`` of each chunk's steps
    (padding repeats the chunk's last row) and which steps are real ``(C, length)``."""
    n = len(ends)
    stops = np.flatnonzero(np.asarray(ends, dtype=bool)).tolist()
    if not stops or stops[-1] != n - 1:
        stops.append(n - 1)
    index, valid, start = [], [], 0
    for stop in stops:
        for first in range(start, stop + 1, length):
            rows = np.arange(first, min(first + length, stop + 1))
            index.append(np.pad(rows, (0, length - len(rows)), mode="edge"))
            valid.append(np.arange(length) < len(rows))
        start = stop + 1
    return np.stack(index), np.stack(valid)


def unroll(actor: torch.nn.Module, layout: StateLayout, obs: torch.Tensor, start: torch.Tensor) -> list[torch.Tensor]:
    """Run ``actor`` over sequences: observations ``(C, L, obs_dim)`` from packed start states
    ``(C, width)`` → each action head stacked over time, ``(C, L, k)``."""
    chunks, steps = obs.shape[:2]
    state = layout.model_inputs(torch.cat([obs[:, 0], start], dim=1))[1:]
    per_step: list[list[torch.Tensor]] = []
    for t in range(steps):
        outputs = as_heads(actor(obs[:, t], *state))
        heads, state = outputs[:-len(state)], outputs[-len(state):]
        per_step.append([h.expand(chunks, h.shape[-1]) if h.ndim == 1 else h for h in heads])  # a log-std parameter
    return [torch.stack([step[i] for step in per_step], dim=1) for i in range(len(per_step[0]))]


class RecurrentPPOLearner(PPOLearner):
    """PPO on a recurrent actor ``(obs, *state) → (*heads, *new_state)``; rows are packed
    ``[obs | state]`` (``obs_dim`` is the observation's width, without the state)."""

    def __init__(
        self,
        actor: torch.nn.Module,
        obs_dim: int,
        layout: StateLayout,
        space: ActionSpace,
        config: PPOConfig,
        bptt_steps: int = 16,
        seed: int | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__(actor, obs_dim + layout.width, space, config, seed, device)
        self.layout, self.obs_dim, self.bptt_steps = layout, obs_dim, bptt_steps

    def _heads(self, obs: torch.Tensor) -> list[torch.Tensor]:
        """One step from each row's stored state (the old log-probs, where a client sent none)."""
        heads, _ = self.layout.split_outputs(as_heads(self.actor(*self.layout.model_inputs(obs))))
        return heads

    def _rollout(self, batch: ExperienceBatch) -> dict[str, torch.Tensor]:
        """As PPO's, plus where each fragment ends (the chunks stop there)."""
        ends = (batch.episode_end | batch.segment_end).astype(np.float32)
        return super()._rollout(batch) | {"ends": torch.as_tensor(ends, device=self.device)}

    def _optimise(self, b: dict[str, torch.Tensor]) -> dict[str, float]:
        """The epochs of minibatch steps over shuffled chunks (not rows: a chunk's steps stay in order)."""
        ends = (b["ends"] > 0).cpu().numpy()
        index, valid = sequence_chunks(ends, self.bptt_steps)
        index_t, valid_t = torch.as_tensor(index, device=self.device), torch.as_tensor(valid, device=self.device)
        c, chunks = self.config, len(index)
        num_minibatches = max(1, min(c.num_minibatches, chunks // 2))
        totals: dict[str, float] = {}
        steps = epochs = 0
        for epoch in range(c.update_epochs):
            order = torch.randperm(chunks, generator=self.generator).to(self.device)
            for i, mb_chunks in enumerate(torch.tensor_split(order, num_minibatches)):
                idx, ok = index_t[mb_chunks], valid_t[mb_chunks]
                rows = idx[ok]  # the real steps, chunk-major, in time order
                keys = ("obs", "actions", "log_probs", "advantages", "returns", "values", "masks")
                mb = {k: b[k][rows] for k in keys if k in b}  # masks: of a masked action space only
                mb["seq_obs"] = b["obs"][idx][..., :self.obs_dim]
                mb["seq_start"] = b["obs"][idx[:, 0], self.obs_dim:]
                mb["seq_valid"] = ok
                step = self._step(mb, f"epoch {epoch} minibatch {i}")
                totals = {k: totals.get(k, 0.0) + v for k, v in step.items()}
                steps += 1
            epochs += 1
            if c.target_kl is not None and step["approx_kl"] > c.target_kl:
                break
        return {**{k: v / steps for k, v in totals.items()}, "epochs": float(epochs), "chunks": float(chunks)}

    def _policy_terms(self, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """New log-probs and entropy of the real steps, the state recomputed through each chunk."""
        heads = unroll(self.actor, self.layout, mb["seq_obs"], mb["seq_start"])
        ok = mb["seq_valid"]
        return log_prob_entropy(self.space, [h[ok] for h in heads], mb["actions"], mb.get("masks"))

    def rows_width(self) -> int:
        """The width of an experience row: the observation and the packed state."""
        return self.obs_dim + self.layout.width
