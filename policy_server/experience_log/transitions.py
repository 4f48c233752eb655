"""An experience log as the trainers' ``ExperienceBatch``: DQN's replay buffer starts from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from policy_server.experience_log.files import load_spaces, read_log
from policy_server.experience_log.join import Episode, episodes
from policy_server.training.experience import ExperienceBatch


def to_batch(runs: list[Episode], action_dtype: type[Any]) -> ExperienceBatch:
    """Every step of ``runs`` as one batch (each run a fragment; a run whose end was not reported
    bootstraps from its last observation). Raises ValueError when ``runs`` hold no step."""
    runs = [r for r in runs if len(r)]
    if not runs:
        raise ValueError("the log holds no step: no decision has its reward yet")
    last = [np.arange(len(r)) == len(r) - 1 for r in runs]
    return ExperienceBatch(
        obs=np.concatenate([r.observations[:-1] for r in runs]),
        next_obs=np.concatenate([r.observations[1:] for r in runs]),
        actions=np.concatenate([r.actions for r in runs]).astype(action_dtype),
        rewards=np.concatenate([r.rewards for r in runs]).astype(np.float32),
        terminated=np.concatenate([end & r.terminated for end, r in zip(last, runs)]),
        truncated=np.concatenate([end & r.truncated for end, r in zip(last, runs)]),
        segment_end=np.concatenate(last),
        log_probs=np.concatenate([r.log_probs for r in runs]).astype(np.float32),
        versions=np.concatenate([r.model_versions for r in runs]),
    )


def logged_batch(folder: Path, policy: str, obs_shape: tuple[int, ...], action_dtype: type[Any]) -> ExperienceBatch:
    """The steps logged in ``folder`` for ``policy`` (or for the folder's only policy).

    Raises ValueError when the folder cannot be read, holds no step, or its observations do not
    hold as many values as ``obs_shape``."""
    try:
        doc = load_spaces(folder, policy if (folder / f"{policy}.spaces.json").is_file() else None)
        batch = to_batch(episodes(read_log(folder, doc["policy"])), action_dtype)
    except (OSError, ValueError) as exc:
        raise ValueError(f"training.from_log: {folder}: {exc}") from exc
    if int(np.prod(batch.obs.shape[1:])) != int(np.prod(obs_shape)):
        raise ValueError(f"training.from_log: {folder} holds observations of shape {list(batch.obs.shape[1:])}; "
                         f"this policy's model takes {list(obs_shape)}")
    return batch
