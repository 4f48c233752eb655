"""Action spaces: turn a policy's raw outputs ("heads") into actions and distributions.

A discrete policy has one head, logits ``(B, n)``; a multi-discrete (tuple) policy one logits
head per component; a multi-binary policy one head of ``n`` Bernoulli logits; a box policy two
heads, mean and log-std ``(B, d)``. Distributions are exact: computed from the logits (or the
Gaussian's parameters), never estimated by sampling.

Masks (discrete and multi-discrete only) are bool ``(B, mask_width)`` arrays, True = allowed, the
components' columns side by side; a masked action has probability exactly 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from policy_server.policies import distributions as D
from policy_server.schema.config import BoxSpec, DiscreteSpec, MultiBinarySpec, TupleSpec

Action = int | list[int] | list[float]
Mask = np.ndarray | None


@dataclass(frozen=True)
class ActionSample:
    action: Action
    log_prob: float
    probability: float | None
    action_name: str | list[str] | None = None


class ActionSpace(ABC):
    """One kind of action space, with its sizes resolved against the model."""

    kind: str
    mask_width: int = 0
    """Columns of an action mask (0: the space takes no mask)."""

    @abstractmethod
    def sample(self, heads: list[np.ndarray], rng: np.random.Generator, mask: Mask = None) -> list[ActionSample]: ...

    @abstractmethod
    def mode(self, heads: list[np.ndarray], mask: Mask = None) -> list[ActionSample]:
        """The most likely action: argmax per (allowed) component, the mean for a box."""

    @abstractmethod
    def distribution(self, heads: list[np.ndarray], mask: Mask = None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def describe(self) -> dict[str, Any]: ...

    def mask_problems(self, mask: np.ndarray) -> list[tuple[int, str]]:
        """``(row, message)`` for each row of a ``(B, mask_width)`` mask that allows no action in a
        component (nothing could be answered)."""
        return []

    def forbidden_actions(self, mask: np.ndarray, actions: np.ndarray) -> list[tuple[int, list[int]]]:
        """``(row, components)`` for each row whose action (int64 ``(B, k)`` indices, as
        ``ExperienceBatch.actions``) its mask (bool ``(B, mask_width)``) forbids, with the indices of
        the forbidden components (``[0]`` for a discrete action); rows in order. Spaces that take no
        mask forbid nothing."""
        return []


def _labels(names: list[str] | None, n: int) -> list[str]:
    return list(names) if names else [str(i) for i in range(n)]


class TupleSpace(ActionSpace):
    """Independent categorical components (Gymnasium's ``MultiDiscrete``); the schema calls it
    ``tuple`` or ``multi_discrete`` (``kind``), which answer alike."""

    kind = "tuple"

    def __init__(self, nvec: list[int], names: list[list[str]] | None = None, kind: str = "tuple") -> None:
        self.nvec = list(nvec)
        self.component_labels = [_labels(names[i] if names else None, n) for i, n in enumerate(self.nvec)]
        self.labels: list[str] | list[list[str]] = self.component_labels
        self.kind = kind
        self.mask_width = sum(self.nvec)
        self._splits = np.cumsum(self.nvec)[:-1]

    def _masks(self, mask: Mask) -> list[Mask]:
        return [None] * len(self.nvec) if mask is None else np.split(mask, self._splits, axis=-1)

    def _answer(self, heads: list[np.ndarray], actions: list[np.ndarray], mask: Mask) -> list[ActionSample]:
        """Answers for chosen actions ``(B,)`` per component; probabilities are of the joint action."""
        masks = self._masks(mask)
        joint = np.sum([D.gather(D.log_softmax(h, m), a) for h, m, a in zip(heads, masks, actions)], axis=0)
        rows = np.stack(actions, axis=1).tolist()  # one bulk conversion, not B × k int() calls
        return [self._sample(row, lp, p) for row, lp, p in zip(rows, joint.tolist(), np.exp(joint).tolist())]

    def _sample(self, row: list[int], log_prob: float, probability: float) -> ActionSample:
        return ActionSample(row, log_prob, probability, [lab[i] for lab, i in zip(self.component_labels, row)])

    def sample(self, heads, rng, mask=None):
        masks = self._masks(mask)
        return self._answer(heads, [D.sample_categorical(h, rng, m) for h, m in zip(heads, masks)], mask)

    def mode(self, heads, mask=None):
        return self._answer(heads, [D.argmax(h, m) for h, m in zip(heads, self._masks(mask))], mask)

    def distribution(self, heads, mask=None):
        probs = [np.exp(D.log_softmax(h, m)).tolist() for h, m in zip(heads, self._masks(mask))]
        return [
            {"components": [dict(zip(lab, p[b])) for lab, p in zip(self.component_labels, probs)]}
            for b in range(len(probs[0]))
        ]

    def mask_problems(self, mask):
        empty = np.stack([~m.any(axis=-1) for m in self._masks(mask)], axis=1)  # (B, k)
        return [(int(b), self._empty(int(i))) for b, i in zip(*np.nonzero(empty))]

    def forbidden_actions(self, mask, actions):
        columns = actions + np.concatenate([[0], self._splits]).astype(np.int64)  # each component's column
        forbidden = ~np.take_along_axis(mask, columns, axis=1)  # (B, k)
        return [(int(b), np.flatnonzero(forbidden[b]).tolist()) for b in np.flatnonzero(forbidden.any(axis=1))]

    def _empty(self, component: int) -> str:
        return f"component {component} of the action: the mask allows none of its {self.nvec[component]} actions"

    def describe(self):
        return {"type": self.kind, "nvec": self.nvec, "names": self.component_labels}


class DiscreteSpace(TupleSpace):
    """One categorical action out of ``n``: a tuple space of one component answered as a number."""

    kind = "discrete"

    def __init__(self, n: int, names: list[str] | None = None) -> None:
        super().__init__([n], [names] if names else None, kind="discrete")
        self.n, self.labels = n, self.component_labels[0]

    def _sample(self, row, log_prob, probability):
        return ActionSample(row[0], log_prob, probability, self.component_labels[0][row[0]])

    def distribution(self, heads, mask=None):
        probs = np.exp(D.log_softmax(heads[0], mask)).tolist()
        return [{"probabilities": dict(zip(self.component_labels[0], row))} for row in probs]

    def _empty(self, component):
        return f"the mask allows none of the {self.n} actions"

    def describe(self):
        return {"type": "discrete", "n": self.n, "names": self.component_labels[0]}


class MultiBinarySpace(ActionSpace):
    """``n`` independent bits, ``P(bit i = 1) = sigmoid(logit i)``; the action is a list of 0/1."""

    kind = "multi_binary"

    def __init__(self, n: int) -> None:
        self.n = n

    def _answer(self, logits: np.ndarray, bits: np.ndarray) -> list[ActionSample]:
        log_probs = D.bernoulli_log_prob(bits, logits)
        return [ActionSample(row, lp, p) for row, lp, p in
                zip(bits.astype(np.int64).tolist(), log_probs.tolist(), np.exp(log_probs).tolist())]

    def sample(self, heads, rng, mask=None):
        probs = np.exp(D.log_sigmoid(heads[0].astype(np.float64)))
        return self._answer(heads[0], rng.uniform(size=probs.shape) < probs)

    def mode(self, heads, mask=None):
        return self._answer(heads[0], heads[0] > 0)

    def distribution(self, heads, mask=None):
        return [{"bits": row} for row in np.exp(D.log_sigmoid(heads[0].astype(np.float64))).tolist()]

    def describe(self):
        return {"type": "multi_binary", "n": self.n}


Squash = Literal["clip", "tanh"]


class BoxSpace(ActionSpace):
    """Diagonal Gaussian over ``u``; the action is ``clip(u, low, high)`` (``squash="clip"``) or
    ``low + (tanh(u) + 1)/2 · (high - low)`` (``"tanh"``). Each answer's log-prob is a function of
    the answered action, the one the trainer evaluates: the censored Gaussian's for a clipped
    action (mass at a bound, density inside), the change of variables for a squashed one."""

    kind = "box"

    def __init__(self, dim: int, low: np.ndarray, high: np.ndarray, squash: Squash = "clip") -> None:
        self.dim, self.low, self.high, self.squash = dim, low, high, squash

    def log_prob(self, action: np.ndarray, mean: np.ndarray, log_std: np.ndarray) -> np.ndarray:
        """Log-likelihood ``(B,)`` of answered actions ``(B, d)``."""
        if self.squash == "tanh":
            return D.tanh_gaussian_log_prob(action, mean, log_std, self.low, self.high)
        return D.clipped_gaussian_log_prob(action, mean, log_std, self.low, self.high)

    def _answer(self, u: np.ndarray, mean: np.ndarray, log_std: np.ndarray) -> list[ActionSample]:
        action = D.squash(u, self.low, self.high) if self.squash == "tanh" else np.clip(u, self.low, self.high)
        log_probs = self.log_prob(action, mean, log_std).tolist()
        return [ActionSample(action=a, log_prob=lp, probability=None) for a, lp in zip(action.tolist(), log_probs)]

    def sample(self, heads, rng, mask=None):
        mean, log_std = (h.astype(np.float64) for h in heads)
        return self._answer(mean + np.exp(log_std) * rng.standard_normal(mean.shape), mean, log_std)

    def mode(self, heads, mask=None):
        mean, log_std = (h.astype(np.float64) for h in heads)
        return self._answer(mean, mean, log_std)

    def distribution(self, heads, mask=None):
        mean, log_std = heads
        bounded = self.squash == "tanh" or bool(np.isfinite(self.low).any() or np.isfinite(self.high).any())
        extra = {"squash": self.squash, "low": _finite(self.low), "high": _finite(self.high)} if bounded else {}
        return [{"mean": m, "std": s} | extra for m, s in zip(mean.tolist(), np.exp(log_std).tolist())]

    def describe(self):
        squash = {"squash": "tanh"} if self.squash == "tanh" else {}
        return {"type": "box", "shape": [self.dim], "low": _finite(self.low), "high": _finite(self.high)} | squash


def _finite(bounds: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in bounds]


SpaceSpec = DiscreteSpec | TupleSpec | MultiBinarySpec | BoxSpec


def make_action_space(spec: SpaceSpec, heads: list[np.ndarray], where: str) -> ActionSpace:
    """Check the model's outputs (``heads`` of a probe batch) against the schema and resolve sizes.

    Raises ValueError naming the schema field and both numbers when they disagree.
    """
    widths = [h.shape[-1] if h.ndim == 2 else None for h in heads]
    if None in widths:
        shapes = [list(h.shape) for h in heads]
        raise ValueError(f"{where}: model outputs must be (batch, n) arrays; got shapes {shapes}")
    if isinstance(spec, DiscreteSpec):
        if len(heads) != 1:
            raise ValueError(f"{where}.type: discrete needs one logits output; the model returns {len(heads)}")
        n = widths[0]
        if spec.n is not None and spec.n != n:
            raise ValueError(f"{where}.n: the schema says {spec.n} actions but the model outputs {n} logits")
        if spec.names is not None and len(spec.names) != n:
            raise ValueError(f"{where}.names: {len(spec.names)} names for {n} model outputs")
        return DiscreteSpace(n, spec.names)
    if isinstance(spec, TupleSpec):
        if spec.nvec is not None and list(spec.nvec) != widths:
            raise ValueError(f"{where}.nvec: the schema says {list(spec.nvec)} but the model's heads have {widths} logits")
        if spec.names is not None and [len(n) for n in spec.names] != widths:
            raise ValueError(f"{where}.names: sizes {[len(n) for n in spec.names]} but the model's heads have {widths}")
        return TupleSpace(widths, spec.names, kind=spec.type)  # type: ignore[arg-type]
    if isinstance(spec, MultiBinarySpec):
        if len(heads) != 1 or (spec.n is not None and spec.n != widths[0]):
            raise ValueError(f"{where}.n: multi_binary needs one (batch, n) logits output with n = {spec.n}; "
                             f"the model's outputs have widths {widths}")
        return MultiBinarySpace(widths[0])  # type: ignore[arg-type]
    if len(heads) != 2 or widths[0] != widths[1]:
        raise ValueError(f"{where}.type: box needs two (batch, d) outputs, mean and log-std; got widths {widths}")
    dim = widths[0]
    assert dim is not None
    if spec.shape is not None and int(np.prod(spec.shape)) != dim:
        raise ValueError(f"{where}.shape: the schema says {spec.shape} but the model's mean has {dim} values")
    low, high = _bound(spec.low, dim, -np.inf, f"{where}.low"), _bound(spec.high, dim, np.inf, f"{where}.high")
    if spec.squash == "tanh":
        for name, bound in (("low", low), ("high", high)):
            if not np.isfinite(bound).all():
                raise ValueError(f"{where}.{name}: squash: tanh needs finite bounds; got {_finite(bound)}")
        if not (low < high).all():
            raise ValueError(f"{where}.low: squash: tanh needs low < high in every dimension")
    return BoxSpace(dim, low, high, "tanh" if spec.squash == "tanh" else "clip")


def _bound(value: float | list[float] | None, dim: int, default: float, where: str) -> np.ndarray:
    arr = np.full(dim, default if value is None else 0.0)
    if value is None:
        return arr
    values = np.asarray(value, dtype=np.float64).reshape(-1)
    if values.size not in (1, dim):
        raise ValueError(f"{where}: {values.size} bounds for an action of {dim} values")
    return arr + values
