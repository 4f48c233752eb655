"""An experience log as a Minari dataset (``minari.create_dataset_from_buffers``), offline.

Each ended episode of the log (``join.episodes``: the client reported ``terminated`` or
``truncated``) becomes one Minari episode, in the policy's Gymnasium spaces (its
``<policy>.spaces.json``). Runs whose end was never reported are left out and counted. The
dataset is written where Minari keeps local datasets (``MINARI_DATASETS_PATH``, default
``~/.minari/datasets``), in Minari's Arrow format, without JPEG encoding (images stay exact).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import gymnasium.spaces as gs
import numpy as np

from policy_server.experience_log.files import load_spaces, read_log
from policy_server.experience_log.join import Episode, episodes
from policy_server.experience_log.spaces import read_spaces


def observations(rows: np.ndarray, space: gs.Space[Any], model_input: tuple[int, ...]) -> Any:
    """Logged model inputs ``(T+1, *model_input)`` in ``space``: a Box's as they are (its dtype);
    any other space's rows are ``gymnasium.spaces.flatten`` of it, unflattened here."""
    if isinstance(space, gs.Box) and space.shape == model_input:
        return rows.astype(space.dtype, copy=False)
    return _stack([gs.unflatten(space, row) for row in rows])


def _stack(items: list[Any]) -> Any:
    """A list of (nested dict/tuple) samples as one (nested) structure of stacked arrays."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _stack([i[k] for i in items]) for k in first}
    if isinstance(first, tuple):
        return tuple(_stack([i[n] for i in items]) for n in range(len(first)))
    return np.stack(items)


def actions(logged: np.ndarray, space: gs.Space[Any]) -> np.ndarray:
    """Logged actions float64 ``(T, k)`` in ``space``'s dtype and shape."""
    if isinstance(space, gs.Discrete):
        return logged[:, 0].astype(space.dtype)
    assert space.shape is not None
    return logged.reshape(len(logged), *space.shape).astype(space.dtype)


def buffers(found: list[Episode], obs_space: gs.Space[Any], action_space: gs.Space[Any],
            model_input: tuple[int, ...]) -> list[Any]:
    """Minari episode buffers of the ended episodes."""
    from minari.data_collector.episode_buffer import EpisodeBuffer

    out = []
    for i, e in enumerate(found):
        t = len(e)
        last = np.arange(t) == t - 1
        out.append(EpisodeBuffer(
            id=i,
            observations=observations(e.observations, obs_space, model_input),
            actions=actions(e.actions, action_space),
            rewards=e.rewards,
            terminations=last & e.terminated,
            truncations=last & e.truncated,
        ))
    return out


def export_minari(folder: Path | str, dataset_id: str, policy: str | None = None,
                  description: str | None = None) -> dict[str, Any]:
    """Write the log in ``folder`` as the local Minari dataset ``dataset_id``; returns what it wrote.

    Raises FileNotFoundError (no log, no spaces file), ValueError (no ended episode; the policy
    must be named), and Minari's own errors (a dataset of that id exists already)."""
    import minari

    folder = Path(folder)
    doc = load_spaces(folder, policy)
    obs_space, action_space, model_input = read_spaces(doc)
    runs = episodes(read_log(folder, doc["policy"]))
    ended = [e for e in runs if e.ended]
    if not ended:
        raise ValueError(f"{folder}: no episode of policy {doc['policy']!r} has ended yet "
                         f"({len(runs)} runs without a reported end): nothing to export")
    with warnings.catch_warnings():  # Minari warns of every optional metadata field left empty (env, author, ...)
        warnings.simplefilter("ignore", UserWarning)
        dataset = minari.create_dataset_from_buffers(
            dataset_id,
            buffers(ended, obs_space, action_space, model_input),
            observation_space=obs_space,
            action_space=action_space,
            algorithm_name="policy-server experience log",
            description=description or f"Decisions served by policy-server's policy {doc['policy']!r}, from {folder}",
            data_format="arrow",
            jpeg_encoding=False,
        )
    return {"dataset_id": dataset_id, "episodes": dataset.total_episodes, "steps": dataset.total_steps,
            "left_out_runs": len(runs) - len(ended)}
