"""Action spaces: turn a policy's raw outputs ("heads") into actions and distributions.

A discrete policy has one head, logits ``(B, n)``; a tuple policy one logits head per component;
a box policy two heads, mean and log-std ``(B, d)``. Distributions are exact: computed from the
logits (or the Gaussian's parameters), never estimated by sampling.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from policy_server.policies import distributions as D
from policy_server.schema.config import BoxSpec, DiscreteSpec, TupleSpec

Action = int | list[int] | list[float]


@dataclass(frozen=True)
class ActionSample:
    action: Action
    log_prob: float
    probability: float | None
    action_name: str | list[str] | None = None


class ActionSpace(ABC):
    """One kind of action space, with its sizes resolved against the model."""

    kind: str

    @abstractmethod
    def sample(self, heads: list[np.ndarray], rng: np.random.Generator) -> list[ActionSample]: ...

    @abstractmethod
    def mode(self, heads: list[np.ndarray]) -> list[ActionSample]:
        """The most likely action: argmax per component, the mean for a box."""

    @abstractmethod
    def distribution(self, heads: list[np.ndarray]) -> list[dict[str, Any]]: ...

    @abstractmethod
    def describe(self) -> dict[str, Any]: ...


def _labels(names: list[str] | None, n: int) -> list[str]:
    return list(names) if names else [str(i) for i in range(n)]


def _categorical_samples(
    logits: list[np.ndarray], actions: list[np.ndarray], labels: list[list[str]], single: bool
) -> list[ActionSample]:
    """Answers for chosen actions ``(B,)`` per component; probabilities are of the joint action."""
    joint = np.sum([D.gather(D.log_softmax(lg), a) for lg, a in zip(logits, actions)], axis=0)
    rows = np.stack(actions, axis=1).tolist()  # one bulk conversion, not B × k int() calls
    if single:
        return [
            ActionSample(row[0], lp, p, labels[0][row[0]])
            for row, lp, p in zip(rows, joint.tolist(), np.exp(joint).tolist())
        ]
    return [
        ActionSample(row, lp, p, [lab[i] for lab, i in zip(labels, row)])
        for row, lp, p in zip(rows, joint.tolist(), np.exp(joint).tolist())
    ]


class DiscreteSpace(ActionSpace):
    kind = "discrete"

    def __init__(self, n: int, names: list[str] | None = None) -> None:
        self.n, self.labels = n, _labels(names, n)

    def sample(self, heads, rng):
        return _categorical_samples(heads, [D.sample_categorical(heads[0], rng)], [self.labels], True)

    def mode(self, heads):
        return _categorical_samples(heads, [heads[0].argmax(axis=-1)], [self.labels], True)

    def distribution(self, heads):
        probs = np.exp(D.log_softmax(heads[0])).tolist()
        return [{"probabilities": dict(zip(self.labels, row))} for row in probs]

    def describe(self):
        return {"type": "discrete", "n": self.n, "names": self.labels}


class TupleSpace(ActionSpace):
    kind = "tuple"

    def __init__(self, nvec: list[int], names: list[list[str]] | None = None) -> None:
        self.nvec = list(nvec)
        self.labels = [_labels(names[i] if names else None, n) for i, n in enumerate(self.nvec)]

    def sample(self, heads, rng):
        return _categorical_samples(heads, [D.sample_categorical(h, rng) for h in heads], self.labels, False)

    def mode(self, heads):
        return _categorical_samples(heads, [h.argmax(axis=-1) for h in heads], self.labels, False)

    def distribution(self, heads):
        probs = [np.exp(D.log_softmax(h)).tolist() for h in heads]
        return [
            {"components": [dict(zip(lab, p[b])) for lab, p in zip(self.labels, probs)]}
            for b in range(len(probs[0]))
        ]

    def describe(self):
        return {"type": "tuple", "nvec": self.nvec, "names": self.labels}


class BoxSpace(ActionSpace):
    """Diagonal Gaussian; actions are clipped to ``[low, high]``, log-probs are of the raw draw."""

    kind = "box"

    def __init__(self, dim: int, low: np.ndarray, high: np.ndarray) -> None:
        self.dim, self.low, self.high = dim, low, high

    def _answer(self, raw: np.ndarray, mean: np.ndarray, log_std: np.ndarray) -> list[ActionSample]:
        log_probs = D.gaussian_log_prob(raw, mean, log_std).tolist()
        clipped = np.clip(raw, self.low, self.high).tolist()
        return [ActionSample(action=a, log_prob=lp, probability=None) for a, lp in zip(clipped, log_probs)]

    def sample(self, heads, rng):
        mean, log_std = heads
        return self._answer(mean + np.exp(log_std) * rng.standard_normal(mean.shape), mean, log_std)

    def mode(self, heads):
        mean, log_std = heads
        return self._answer(mean, mean, log_std)

    def distribution(self, heads):
        mean, log_std = heads
        return [{"mean": m, "std": s} for m, s in zip(mean.tolist(), np.exp(log_std).tolist())]

    def describe(self):
        finite = lambda a: [float(v) if np.isfinite(v) else None for v in a]  # noqa: E731
        return {"type": "box", "shape": [self.dim], "low": finite(self.low), "high": finite(self.high)}


def make_action_space(spec: DiscreteSpec | TupleSpec | BoxSpec, heads: list[np.ndarray], where: str) -> ActionSpace:
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
        return TupleSpace(widths, spec.names)
    if len(heads) != 2 or widths[0] != widths[1]:
        raise ValueError(f"{where}.type: box needs two (batch, d) outputs, mean and log-std; got widths {widths}")
    dim = widths[0]
    if spec.shape is not None and int(np.prod(spec.shape)) != dim:
        raise ValueError(f"{where}.shape: the schema says {spec.shape} but the model's mean has {dim} values")
    return BoxSpace(dim, _bound(spec.low, dim, -np.inf, f"{where}.low"), _bound(spec.high, dim, np.inf, f"{where}.high"))


def _bound(value: float | list[float] | None, dim: int, default: float, where: str) -> np.ndarray:
    arr = np.full(dim, default if value is None else 0.0)
    if value is None:
        return arr
    values = np.asarray(value, dtype=np.float64).reshape(-1)
    if values.size not in (1, dim):
        raise ValueError(f"{where}: {values.size} bounds for an action of {dim} values")
    return arr + values
