"""``/train/experience`` as safetensors: the JSON form's steps, one tensor per field (``policy.binary``)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import gymnasium.spaces as gs
import numpy as np

from policy_server.errors import FieldError, InvalidRequest
from policy_server.gateway.policy.binary import (
    NUMERIC,
    check_tensor,
    leaves,
    model_input,
    observation_space,
    read_safetensors,
    unknown_tensors,
)
from policy_server.gateway.policy.masks import check_mask, forbidden_fields
from policy_server.gateway.training.experience import CLIENT_ID_PATTERN, next_is_following, to_actions
from policy_server.policies.served import ServedPolicy
from policy_server.training.experience import ExperienceBatch

_REAL = gs.Box(-np.inf, np.inf, (), np.float32)
_FLAG = gs.Box(0, 1, (), np.uint8)
_STEP_TENSORS = ("actions", "rewards", "terminated", "truncated", "log_probs")
_METADATA = ("client_id", "model_version", "variant")


def experience(body: bytes, policy: ServedPolicy, max_rows: int) -> tuple[ExperienceBatch, str | None]:
    """The steps of a safetensors ``/train/experience`` body, checked as the JSON form's ``steps``
    are, and the variant that acted them (None when not sent).

    One row per step (``N`` from 1 to ``max_rows``): ``obs`` and ``next_obs`` (``obs.<key>`` /
    ``next_obs.<key>`` for a Dict space) ``(N, ...)``, ``actions`` ``(N,)`` or ``(N, k)`` (indices,
    or a Box's values), ``rewards`` ``(N,)``, optional ``terminated`` and ``truncated`` ``(N,)``
    (bool; false when absent) and ``log_probs`` ``(N,)``, optional action masks ``action_mask``
    and ``next_action_mask`` ``(N, mask_width)`` (bool or 0/1; a Dict space's mask entry may come
    as ``obs.<key>`` / ``next_obs.<key>`` instead; ``action_mask`` wins, as a step's does in JSON);
    metadata ``client_id``, ``model_version`` (decimal text) and optional ``variant``. As in the
    JSON form, consecutive steps whose next observation is the following observation form one
    fragment. Raises InvalidRequest naming the tensor (``body.action_mask.3``: that row allows no
    action; ``body.actions.3``: its action is one that row's mask forbids) or
    ``body.__metadata__.<key>``.
    """
    tensors, metadata = read_safetensors(body)
    client_id, version, variant = _metadata(metadata)
    space = observation_space(policy)
    obs_names = [name for prefix in ("obs", "next_obs") for name, _ in leaves(space, prefix)]
    masks = mask_tensors(policy)
    unknown_tensors(tensors, [*obs_names, *_STEP_TENSORS, *masks], "body")
    for required in ("actions", "rewards"):
        if required not in tensors:
            raise InvalidRequest.at(f"body.{required}", "missing: one row per step")
    rewards = tensors["rewards"]
    n = step_count(tensors, space, masks)
    if not 1 <= n <= max_rows:
        raise InvalidRequest.at("body.rewards", f"shape {list(rewards.shape)}: (N,) with N from 1 to {max_rows} steps")
    obs = model_input(tensors, space, "body", True, n, name="obs")
    next_obs = model_input(tensors, space, "body", True, n, name="next_obs")
    flags = {name: check_tensor(tensors[name], _FLAG, f"body.{name}", n).astype(bool) if name in tensors
             else np.zeros(n, dtype=bool) for name in ("terminated", "truncated")}
    log_probs = (check_tensor(tensors["log_probs"], _REAL, "body.log_probs", n) if "log_probs" in tensors
                 else np.full(n, np.nan, dtype=np.float32))
    follows = next_is_following(obs, next_obs)
    terminated, truncated = flags["terminated"], flags["truncated"] & ~flags["terminated"]
    actions = _actions(tensors["actions"], policy, n)
    acted_masks = _step_masks(tensors, masks, policy, n, "obs", "action_mask")
    if acted_masks is not None:
        name = _mask_name(tensors, masks, policy, "obs", "action_mask")
        forbidden = forbidden_fields(policy.space, acted_masks, actions, [f"body.actions.{i}" for i in range(n)],
                                     [f"body.{name}.{i}" for i in range(n)])
        if forbidden:
            raise InvalidRequest(f"{forbidden[0].field}: {forbidden[0].message}", forbidden)
    batch = ExperienceBatch(
        obs=obs, next_obs=next_obs, actions=actions,
        rewards=check_tensor(rewards, _REAL, "body.rewards", n), terminated=terminated, truncated=truncated,
        segment_end=terminated | truncated | ~follows, log_probs=log_probs,
        versions=np.full(n, version, dtype=np.int64), client_id=client_id,
        masks=acted_masks,
        next_masks=_step_masks(tensors, masks, policy, n, "next_obs", "next_action_mask"),
    )
    return batch, variant


def mask_tensors(policy: ServedPolicy) -> dict[str, gs.Space[Any]]:
    """The optional tensors of an experience body that hold action masks, and each row's space:
    ``action_mask``, ``next_action_mask`` and a Dict space's mask entry ``obs.<key>`` /
    ``next_obs.<key>`` (none for an action space that takes no mask)."""
    width = policy.space.mask_width
    if not width:
        return {}
    found: dict[str, gs.Space[Any]] = {"action_mask": gs.MultiBinary(width), "next_action_mask": gs.MultiBinary(width)}
    if isinstance(policy.obs_space, gs.Dict) and policy.mask_key is not None:
        entry = policy.obs_space.spaces[policy.mask_key]
        found |= {f"obs.{policy.mask_key}": entry, f"next_obs.{policy.mask_key}": entry}
    return found


def _step_masks(
    tensors: dict[str, np.ndarray], masks: dict[str, gs.Space[Any]], policy: ServedPolicy, n: int, obs: str, given: str
) -> np.ndarray | None:
    """The masks at ``obs`` (``obs`` or ``next_obs``) as bool ``(N, mask_width)``: the ``given``
    tensor, else the observation's mask entry, else None. At ``obs``, where an action was chosen,
    a row that allows no action (in a component) is refused naming it; a next state may allow none
    (a terminal one)."""
    name = _mask_name(tensors, masks, policy, obs, given)
    if name is None:
        return None
    rows = check_tensor(tensors[name], masks[name], f"body.{name}", n).reshape(n, -1).astype(bool)
    if obs == "obs":
        check_mask(policy.space, rows, [f"body.{name}.{i}" for i in range(n)])
    return rows


def _mask_name(
    tensors: dict[str, np.ndarray], masks: dict[str, gs.Space[Any]], policy: ServedPolicy, obs: str, given: str
) -> str | None:
    """The tensor that holds the masks at ``obs``: ``given`` if sent, else the observation's mask entry."""
    return next((t for t in (given, f"{obs}.{policy.mask_key}") if t in tensors and t in masks), None)


def step_count(tensors: dict[str, np.ndarray], space: gs.Space[Any], masks: dict[str, gs.Space[Any]] | None = None) -> int:
    """``N``, the number of steps of a body: the row count most of its step tensors share (the
    observations' first, on a tie); 0 when no tensor has the rank of rows.

    Raises InvalidRequest naming each tensor whose rows differ from ``N`` (the one tensor that is
    wrong, not the others: 8 observations with 7 rewards name ``body.rewards``). A tensor of the
    wrong rank is left to its own check, which names it."""
    ranks = {name: (len(sub.shape) + 1,) for prefix in ("obs", "next_obs") for name, sub in leaves(space, prefix)}
    ranks |= {name: (1,) for name in _STEP_TENSORS} | {"actions": (1, 2)}
    ranks |= {name: (len(sub.shape) + 1,) for name, sub in (masks or {}).items()}
    rows = {name: tensors[name].shape[0] for name, allowed in ranks.items()
            if name in tensors and tensors[name].ndim in allowed}
    if not rows:
        return 0
    n = Counter(rows.values()).most_common(1)[0][0]  # Counter keeps first-seen order on ties
    agreeing = ", ".join(name for name, count in rows.items() if count == n)
    wrong = [FieldError(f"body.{name}", f"{count} rows, but {agreeing} have {n}: one row per step")
             for name, count in rows.items() if count != n]
    if wrong:
        raise InvalidRequest(f"{wrong[0].field}: {wrong[0].message}", wrong)
    return n


def _actions(actions: np.ndarray, policy: ServedPolicy, n: int) -> np.ndarray:
    """The actions checked as the JSON form's (``experience.to_actions``), from ``(N,)`` or ``(N, k)``."""
    if actions.dtype.kind not in NUMERIC or actions.ndim not in (1, 2) or actions.shape[0] != n:
        raise InvalidRequest.at("body.actions", f"{actions.dtype} of shape {list(actions.shape)}: numbers of "
                                f"shape ({n},) or ({n}, k), one row per step")
    if actions.dtype.kind == "f":
        check_tensor(actions, gs.Box(-np.inf, np.inf, actions.shape[1:], np.float32), "body.actions", n)
    errors: list[FieldError] = []
    checked = to_actions(actions.reshape(n, -1).tolist(), "body.actions", policy, errors)
    if checked is None:
        raise InvalidRequest(f"invalid experience: {errors[0].field}: {errors[0].message}", errors[:20])
    return checked


def _metadata(metadata: dict[str, str]) -> tuple[str, int, str | None]:
    """``client_id``, ``model_version`` and ``variant`` of the safetensors ``__metadata__``."""
    where = "body.__metadata__"
    unknown_tensors(metadata, list(_METADATA), where)
    client_id = metadata.get("client_id", "")
    if not (1 <= len(client_id) <= 128 and re.fullmatch(CLIENT_ID_PATTERN, client_id)):
        raise InvalidRequest.at(f"{where}.client_id", f"{client_id!r}: 1 to 128 of A-Z a-z 0-9 _ . : -")
    version = metadata.get("model_version", "")
    if not re.fullmatch("[0-9]+", version) or int(version) > np.iinfo(np.int64).max:
        raise InvalidRequest.at(f"{where}.model_version", f"{version!r}: the model version that acted, in decimal")
    variant = metadata.get("variant")
    if variant not in (None, "stable", "canary"):
        raise InvalidRequest.at(f"{where}.variant", f"{variant!r}: stable or canary")
    return client_id, int(version), variant
