"""Running statistics for normalisation: a running mean and variance, and a reward scaler.

As gym's ``NormalizeReward`` (which cleanrl's continuous PPO uses): rewards are divided by the
running standard deviation of the discounted return, kept per stream (one stream per client,
since each client steps its own episodes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from policy_server.training.guard import MAX_SQUARABLE


class RunningMeanStd:
    """Mean and (population) variance of every sample seen, merged batch by batch.

    Chan et al.'s parallel update, as in gym and cleanrl; ``count`` starts at ``epsilon`` so an
    empty estimate is (0, 1) rather than undefined.
    """

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4) -> None:
        self.mean = np.zeros(shape, dtype=np.float64)
        self.var = np.ones(shape, dtype=np.float64)
        self.count = epsilon

    def update(self, x: np.ndarray) -> None:
        """Merge a batch ``(N, *shape)``."""
        x = np.asarray(x, dtype=np.float64)
        if len(x) == 0:
            return
        batch_mean, batch_var, batch_count = x.mean(axis=0), x.var(axis=0), len(x)
        delta = batch_mean - self.mean
        total = self.count + batch_count
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.mean = self.mean + delta * batch_count / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": torch.tensor(self.mean, dtype=torch.float64),
                "var": torch.tensor(self.var, dtype=torch.float64), "count": float(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = state["mean"].numpy().astype(np.float64)
        self.var = state["var"].numpy().astype(np.float64)
        self.count = float(state["count"])


class RewardScaler:
    """Scale rewards by the running std of the discounted return, one running return per stream."""

    def __init__(self, gamma: float, epsilon: float = 1e-8) -> None:
        self.gamma, self.epsilon = gamma, epsilon
        self.return_rms = RunningMeanStd()
        self.returns: dict[str, float] = {}  # discounted return so far of each stream's episode

    def __call__(self, rewards: np.ndarray, episode_end: np.ndarray, stream: str) -> np.ndarray:
        """Scaled ``(N,)`` rewards of ``N`` consecutive steps of ``stream``.

        The running return restarts after a row whose episode ended. The statistics take in the
        whole batch before it is scaled (gym updates them step by step; the same in the limit).
        A batch with a return beyond ``MAX_SQUARABLE`` (whose squared error the learner's float32
        value loss cannot hold, so its update is refused anyway) leaves the statistics and the
        stream's running return as they were: one such reward would otherwise dominate the
        variance for good and scale every later reward to nothing. Its rewards are scaled by the
        statistics as they stand (an overflow to inf is left for the learner's guard to refuse).
        """
        returns = np.empty(len(rewards), dtype=np.float64)
        running = self.returns.get(stream, 0.0)
        for t, (r, end) in enumerate(zip(rewards.tolist(), episode_end.tolist())):
            running = running * self.gamma + r
            returns[t] = running
            if end:
                running = 0.0
        if np.all(np.abs(returns) <= MAX_SQUARABLE):  # NaN fails the test too
            self.returns[stream] = running
            self.return_rms.update(returns)
        with np.errstate(over="ignore"):
            return (rewards / np.sqrt(self.return_rms.var + self.epsilon)).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"return_rms": self.return_rms.state_dict(), "returns": dict(self.returns)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.return_rms.load_state_dict(state["return_rms"])
        self.returns = {str(k): float(v) for k, v in state["returns"].items()}
