"""Recurrent state as the serving path carries it: packed into the model-input rows.

The gateway's batcher, the transports and the deployments move one float32 array ``(B, width)``
per batch. A recurrent policy's rows are ``[observation | state]``: the flat observation, then
each state tensor flattened in the schema's order. ``TorchPolicy`` unpacks the rows into
``(obs, *state)`` for the model, and packs the new state it returns behind the action heads, as
one more ``(B, prod(shape))`` head per state tensor. So every replica can answer any row: the
state travels with the request, and batching rows of many episodes stacks their states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from policy_server.errors import FieldError, InvalidRequest
from policy_server.schema.recurrent import RecurrentSpec

State = dict[str, np.ndarray]
"""One state per name, float32 ``(B, *shape)``."""


class StateShapeError(ValueError):
    """A recurrent model's outputs do not end in the state tensors of the schema's shapes."""


@dataclass(frozen=True)
class StateLayout:
    """The names and per-row shapes of a policy's state tensors, in the model's argument order."""

    shapes: dict[str, tuple[int, ...]]

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes.values()]

    @property
    def width(self) -> int:
        """Values of state per row."""
        return sum(self.sizes)

    def zeros(self, rows: int) -> np.ndarray:
        """The packed zero state ``(rows, width)``: the state at an episode's start."""
        return np.zeros((rows, self.width), dtype=np.float32)

    def pack(self, state: State) -> np.ndarray:
        """Named ``(B, *shape)`` arrays → float32 ``(B, width)``; raises ValueError naming a tensor
        whose per-row shape is not the layout's."""
        parts = []
        for name, shape in self.shapes.items():
            value = np.asarray(state[name], dtype=np.float32)
            if value.shape[1:] != shape:
                raise ValueError(f"state {name}: expected per-row shape {list(shape)}, got {list(value.shape[1:])}")
            parts.append(value.reshape(len(value), -1))
        return np.concatenate(parts, axis=1)

    def unpack(self, packed: np.ndarray) -> State:
        """float32 ``(B, width)`` → named ``(B, *shape)`` arrays (views)."""
        offsets = np.cumsum([0, *self.sizes])
        return {name: packed[:, offsets[i]:offsets[i + 1]].reshape(len(packed), *shape)
                for i, (name, shape) in enumerate(self.shapes.items())}

    def model_inputs(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Packed model-input rows ``(B, obs_dim + width)`` → ``[obs (B, obs_dim), *state (B, *shape)]``."""
        obs_dim = rows.shape[1] - self.width
        inputs, start = [rows[:, :obs_dim]], obs_dim
        for size, shape in zip(self.sizes, self.shapes.values(), strict=True):
            inputs.append(rows[:, start:start + size].reshape(len(rows), *shape))
            start += size
        return inputs

    def split_outputs(self, outputs: list[torch.Tensor], where: str = "the model") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The model's ``(*heads, *new_state)`` → (heads, new state flattened ``(B, size)`` each);
        raises StateShapeError naming the state tensor whose shape is not the layout's."""
        k = len(self.shapes)
        if len(outputs) <= k:
            raise StateShapeError(f"{where} returns {len(outputs)} tensors; a recurrent policy returns its "
                             f"action heads, then its {k} state tensors {self.names}")
        heads, states = outputs[:-k], outputs[-k:]
        flat = []
        for name, shape, value in zip(self.names, self.shapes.values(), states, strict=True):
            if tuple(value.shape[1:]) != shape:
                raise StateShapeError(f"recurrent.state.{name}: the schema says per-row shape {list(shape)} but "
                                 f"{where} returns a new {name} of per-row shape {list(value.shape[1:])}")
            flat.append(value.reshape(len(value), -1))
        return heads, flat

    def describe(self) -> dict[str, list[int]]:
        return {name: list(shape) for name, shape in self.shapes.items()}


def state_layout(recurrent: RecurrentSpec | None) -> StateLayout | None:
    """The layout of a policy's ``recurrent:`` section; None for a feed-forward policy."""
    return StateLayout(recurrent.shapes) if recurrent is not None else None


def state_answer(layout: StateLayout, packed: np.ndarray) -> list[dict[str, list]]:
    """Per row, the state as the wire carries it: name → nested lists of its per-row shape."""
    named = layout.unpack(packed)
    lists = {name: value.tolist() for name, value in named.items()}
    return [{name: lists[name][i] for name in layout.names} for i in range(len(packed))]


def state_rows(layout: StateLayout, states: list[dict[str, list] | None], where: list[str]) -> tuple[np.ndarray, list[bool]]:
    """Per-row states of a request (None: zero state) → packed float32 ``(B, width)`` and which rows
    were given one; raises InvalidRequest naming each row's tensor of the wrong shape (the values
    were checked finite as float32 by the request model)."""
    packed = layout.zeros(len(states))
    errors: list[FieldError] = []
    for i, state in enumerate(states):
        if state is None:
            continue
        row: State = {}
        for name, shape in layout.shapes.items():
            try:
                value = np.asarray(state[name], dtype=np.float32)
            except ValueError:  # ragged nested lists
                errors.append(FieldError(f"{where[i]}.state.{name}", f"expected shape {list(shape)}, got ragged lists"))
                continue
            if value.shape != shape:
                errors.append(FieldError(f"{where[i]}.state.{name}", f"expected shape {list(shape)}, got {list(value.shape)}"))
            row[name] = value[None]
        if not errors:
            packed[i] = layout.pack(row)[0]
    if errors:
        raise InvalidRequest(f"{errors[0].field}: {errors[0].message}", errors[:10])
    return packed, [state is not None for state in states]

