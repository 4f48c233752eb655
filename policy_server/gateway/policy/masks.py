"""Action masks as a request carries them, checked before a model runs: a mask that allows no
action (in some component) is a 422 naming the field that holds it.

A request may carry two masks, an observation's (a Dict space's mask entry, ``body.obs.legal``)
and its own ``action_mask``; an action is allowed where both allow it. Each is checked on its own
first, so that the one that allows nothing is the one named; when each allows something but
together they allow nothing, both are named.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from policy_server.errors import FieldError, InvalidRequest
from policy_server.policies.spaces import ActionSpace, DiscreteSpace

MaskPart = tuple[np.ndarray, Sequence[str]]
"""A bool ``(B, mask_width)`` mask and where each of its rows is in the request (``body.action_mask.3``)."""


def check_mask(space: ActionSpace, mask: np.ndarray | None, at: Sequence[str]) -> None:
    """Raise InvalidRequest (422) naming ``at[row]`` for each row of ``mask`` that allows no action
    in a component (the first 10 rows); nothing for None."""
    if mask is None:
        return
    problems = space.mask_problems(mask)
    if problems:
        _refuse([FieldError(at[row], message) for row, message in problems[:10]])


def forbidden_fields(
    space: ActionSpace, mask: np.ndarray | None, actions: np.ndarray | None, action_at: Sequence[str], mask_at: Sequence[str]
) -> list[FieldError]:
    """A FieldError naming ``action_at[row]`` for each row (the first 10) whose action (int64
    ``(N, k)`` indices) its own mask (bool, at least ``N`` rows: a fragment's T+1 masks are cut to
    its T actions) forbids, the message naming ``mask_at[row]``; none when either is None. A client
    that sends such a step has a bug: the trainers would learn from an impossible step."""
    if mask is None or actions is None:
        return []
    fields = []
    for row, components in space.forbidden_actions(mask[: len(actions)], actions)[:10]:
        if not isinstance(space, DiscreteSpace):  # multi_discrete: each forbidden component
            parts = ", ".join(f"component {c} = {actions[row, c]}" for c in components)
            message = f"action {actions[row].tolist()}: its action mask ({mask_at[row]}) forbids {parts}"
        else:
            message = f"action {actions[row, 0]} is one its action mask ({mask_at[row]}) forbids"
        fields.append(FieldError(action_at[row], message))
    return fields


def combine_masks(space: ActionSpace, parts: Sequence[MaskPart]) -> np.ndarray | None:
    """The mask of the actions every part allows, bool ``(B, mask_width)`` (None without parts).

    Raises InvalidRequest naming a part's field when that part alone allows no action in a
    component, else, when only their combination allows none, every part's field of that row
    (each message names the others)."""
    for mask, at in parts:
        check_mask(space, mask, at)
    if len(parts) < 2:
        return parts[0][0] if parts else None
    combined = np.logical_and.reduce([mask for mask, _ in parts])
    fields = []
    for row, message in space.mask_problems(combined)[:10]:
        for i, (_, at) in enumerate(parts):
            others = " and ".join(other[row] for j, (_, other) in enumerate(parts) if j != i)
            fields.append(FieldError(at[row], f"{message} that {others} allows (an action must be allowed by both)"))
    if fields:
        _refuse(fields)
    return combined


def _refuse(fields: list[FieldError]) -> None:
    raise InvalidRequest(f"{fields[0].field}: {fields[0].message}", fields)
