"""One base for every served model whose weights a trainer replaces: torch policies, LLM engines,
value models.

``VersionedWeights`` holds the version of the weights being served and the lock that a forward
pass (or a generate or scoring call) and a weight swap share, so an answer never mixes two
versions and always carries the version that made it. ``set_weights`` checks a whole update
before it changes anything: names, shapes, dtype kinds, and values finite at the precision of the
parameter they go to (a float32 1e5 is infinite in float16); a refused update leaves the served
weights and version as they were.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import numpy as np
import torch

from policy_server.training.guard import nonfinite

Weights = dict[str, Any]
"""Tensors or arrays by parameter name (what ``state_dict`` or ``named_parameters`` names)."""


class VersionedWeights:
    """A model's weights, their version and the lock that guards both.

    Subclasses say which tensors an update may write (``_named_weights``) and whether an update
    may name only some of them (``partial_updates``: an LLM trainer sends its adapter alone).
    Callers hold ``self._lock`` while they compute with the weights.
    """

    partial_updates: ClassVar[bool] = False
    version_in_errors: ClassVar[bool] = True
    """Whether a refusal names the version (``refused weights of version 4: ...``)."""

    def __init__(self, version: int = 0) -> None:
        self.version = version
        self._lock = threading.Lock()

    def _named_weights(self) -> dict[str, torch.Tensor]:
        """The tensors an update writes into, by name (sharing storage with the model)."""
        raise NotImplementedError

    def snapshot(self) -> tuple[dict[str, np.ndarray], int]:
        """Copies of the weights as numpy arrays, and the version they belong to, read together.

        bfloat16, which numpy lacks, comes back as float32 (``set_weights`` casts it back).
        """
        with self._lock:
            return {name: _to_numpy(t) for name, t in self._named_weights().items()}, self.version

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.snapshot()[0]

    def set_weights(self, weights: Weights, version: int) -> int:
        """Load new weights and move to ``version``, atomically; returns ``version``.

        Raises ValueError, changing nothing, when a name is unknown (or, for a full update,
        missing), a shape or dtype kind differs from the model's, or a value is NaN or infinite
        in the parameter's dtype.
        """
        with self._lock:
            current = self._named_weights()
            tensors = check_weights(
                current, weights, partial=self.partial_updates, version=version if self.version_in_errors else None
            )
            with torch.no_grad():
                for name, value in tensors.items():
                    current[name].copy_(value)
            self.version = version
        return version


def check_weights(
    current: dict[str, torch.Tensor], weights: Weights, partial: bool = False, version: int | None = None
) -> dict[str, torch.Tensor]:
    """``weights`` as tensors of ``current``'s dtypes and devices, after checking they fit.

    Raises ValueError naming the offending weights: unknown names (and missing ones unless
    ``partial``), wrong shapes, a dtype of another kind (an int for a float, a float for a bool),
    values that are NaN or infinite once cast to the parameter's dtype.
    """
    unknown = sorted(set(weights) - set(current))
    missing = [] if partial else sorted(set(current) - set(weights))
    if unknown or missing:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unknown {unknown[:5]}")
    given = {name: torch.as_tensor(value) for name, value in weights.items()}
    wrong = {n: (list(t.shape), list(current[n].shape)) for n, t in given.items() if t.shape != current[n].shape}
    if wrong:
        raise ValueError(f"weights have the wrong shapes (given, expected): {dict(list(wrong.items())[:5])}")
    kinds = {n: (str(t.dtype), str(current[n].dtype)) for n, t in given.items() if _kind(t) != _kind(current[n])}
    if kinds:
        raise ValueError(f"weights have dtypes of the wrong kind (given, expected): {dict(list(kinds.items())[:5])}")
    cast = {n: t.to(dtype=current[n].dtype, device=current[n].device) for n, t in given.items()}
    bad = nonfinite(cast)
    if bad:
        of = "" if version is None else f" of version {version}"
        raise ValueError(f"refused weights{of}: {bad[:5]} hold NaN or infinite values; the served weights stay")
    return cast


def _kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    if t.is_complex():
        return "complex"
    return "float" if t.is_floating_point() else "int"


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()
