"""Action masks on the client: the mask an observation carries, read as the server reads it, and
epsilon-greedy exploration among the allowed actions (a DQN client's random action is never one
the environment forbids)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def observation_mask(obs: Any, keys: Sequence[str]) -> np.ndarray | None:
    """The action mask an observation object carries, bool ``(mask_width,)``: its first entry of
    ``keys`` that is present and not None (the schema's ``action_space.mask``, a Pathmind field or
    a Dict key; for Pathmind observations also ``action_mask``, which travels as the request's
    top-level ``action_mask``); None for an array or a vector (they carry no mask)."""
    if not isinstance(obs, Mapping):
        return None
    for key in keys:
        if obs.get(key) is not None:
            return np.asarray(obs[key], dtype=bool).reshape(-1)
    return None


def both(first: np.ndarray | None, second: Sequence[bool] | np.ndarray | None) -> np.ndarray | None:
    """The actions both masks allow (None: a mask that allows every action)."""
    if second is None:
        return first
    given = np.asarray(second, dtype=bool).reshape(-1)
    return given if first is None else first & given


def stacked(masks: Sequence[np.ndarray | None], width: int) -> np.ndarray | None:
    """Per-row masks (None: every action allowed) as bool ``(B, width)``; None when no row has one."""
    if all(mask is None for mask in masks):
        return None
    return np.stack([np.ones(width, dtype=bool) if mask is None else mask for mask in masks])


def epsilon_greedy(
    greedy: int | list[int], sizes: Sequence[int], eps: float, rng: np.random.Generator, mask: np.ndarray | None = None
) -> tuple[int | list[int], float]:
    """With probability ``eps`` an action drawn uniformly among the allowed ones (per component:
    ``sizes`` are the components' numbers of actions, ``mask`` bool ``(sum(sizes),)`` their legal
    actions side by side, None: all), else ``greedy`` (the server's masked argmax). Returns the
    action and its log-probability under this behaviour policy:
    ``log(eps * prod_c [a_c allowed] / |allowed_c| + (1 - eps) [a = greedy])``.

    Raises ValueError when the mask allows no action in a component (the server refuses such a
    mask with a 422 naming it)."""
    splits = np.cumsum(sizes)[:-1]
    allowed = [np.ones(n, dtype=bool) for n in sizes] if mask is None else np.split(np.asarray(mask, bool), splits)
    for c, legal in enumerate(allowed):
        if not legal.any():
            raise ValueError(f"component {c} of the action: the mask allows none of its {sizes[c]} actions")
    action = greedy
    if rng.random() < eps:
        drawn = [int(rng.choice(np.flatnonzero(legal))) for legal in allowed]
        action = drawn[0] if isinstance(greedy, int) else drawn
    components = [action] if isinstance(action, int) else list(action)
    uniform = float(np.prod([1.0 / legal.sum() for legal in allowed]))
    is_legal = all(bool(legal[a]) for legal, a in zip(allowed, components, strict=True))
    p = eps * uniform * is_legal + (1 - eps) * (action == greedy)
    return action, float(np.log(p))
