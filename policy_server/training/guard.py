"""Non-finite updates: find them, refuse them, and roll a failed step back.

Every trainer (torch PPO and DQN, x1's PPO and MSE, GRPO) runs its optimiser steps under
``rollback``: a loss, gradient, new weight or optimiser moment that holds a NaN or an infinity
raises ``NonFiniteUpdate``, and the parameters and the optimiser's state are restored to what
they were before the block, so neither poisoned weights nor Adam moments poisoned by an infinite
gradient survive. The trainer counts the skip and publishes and checkpoints nothing from it.
Serving replicas use ``nonfinite`` to refuse weights before loading them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch

Reason = Literal["data", "loss", "gradient", "weight", "optimizer_state"]
"""What was non-finite: the batch's derived tensors (returns, advantages, targets), the loss, a
gradient, a parameter after the step, or an optimiser moment after the step."""

MAX_SQUARABLE = float(np.sqrt(np.finfo(np.float32).max))
"""About 1.8e19: the largest magnitude whose square (a variance, a squared error) is finite in float32."""


class NonFiniteUpdate(Exception):
    """A training step met a NaN or an infinity; it was rolled back (nothing changed)."""

    def __init__(self, reason: Reason, where: str) -> None:
        super().__init__(f"non-finite {reason.replace('_', ' ')} in {where}")
        self.reason: Reason = reason
        self.where = where


def is_finite(value: torch.Tensor | np.ndarray | float) -> bool:
    """True when every element is finite (no NaN, no ±inf); non-float tensors always are."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    array = np.asarray(value)
    return not np.issubdtype(array.dtype, np.floating) or bool(np.isfinite(array).all())


def nonfinite(named: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[str]:
    """The names of the tensors (or arrays) that hold a NaN or an infinity, in order; None is skipped."""
    items = [(name, value) for name, value in (named.items() if isinstance(named, Mapping) else named)
             if value is not None]
    if _surely_finite([value for _, value in items]):
        return []
    return [name for name, value in items if not is_finite(value)]


def _surely_finite(values: list[Any]) -> bool:
    """True only when every tensor is finite, from one sum per tensor: an infinity or a NaN makes
    the sum infinite or NaN, so a finite sum proves the tensor finite. A finite tensor whose sum
    overflows, or an array, gets False and ``is_finite``'s exact check. (A trainer checks every
    gradient, weight and Adam moment after each step: the sums cost a fifth of ``isfinite``'s
    element-wise pass, measured on the tiny LLM's 60 tensors.)"""
    sums: dict[torch.device, list[torch.Tensor]] = {}
    for value in values:
        if not isinstance(value, torch.Tensor):
            return False
        if value.is_floating_point() and value.numel():
            sums.setdefault(value.device, []).append(value.sum())
    return all(bool(torch.isfinite(torch.stack(group)).all()) for group in sums.values())


def check(reason: Reason, named: Mapping[str, Any] | Iterable[tuple[str, Any]], where: str = "") -> None:
    """Raise ``NonFiniteUpdate(reason)`` naming the first non-finite tensor (and ``where`` it was)."""
    bad = nonfinite(named)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NonFiniteUpdate(reason, f"{bad[0]}{more}" + (f" at {where}" if where else ""))


def check_loss(loss: torch.Tensor, where: str) -> None:
    """Before ``backward``: a non-finite loss would only make non-finite gradients."""
    check("loss", [("the loss", loss.detach())], where)


def check_gradients(named_params: Iterable[tuple[str, torch.nn.Parameter]], where: str) -> None:
    """Before clipping: ``clip_grad_norm_`` makes one infinite gradient NaN and zeroes the others."""
    check("gradient", ((name, p.grad) for name, p in named_params), where)


def check_step(named_params: Iterable[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer, where: str) -> None:
    """After a step: every trained parameter and every optimiser moment is still finite."""
    named_params = list(named_params)
    check("weight", ((name, p.detach()) for name, p in named_params), where)
    names = {id(p): name for name, p in named_params}
    moments = (
        (f"{key} of {names.get(id(p), 'a parameter')}", value)
        for p, state in optimizer.state.items()
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    )
    check("optimizer_state", moments, where)


def _trained(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@contextmanager
def rollback(optimizer: torch.optim.Optimizer, extra: Iterable[torch.Tensor] = ()) -> Iterator[None]:
    """Restore the optimiser's parameters, its state and ``extra`` tensors when the block raises.

    Copies what a step changes (the trained parameters and the optimiser's moments), on their own
    device, when the block starts; on any exception puts them back, drops the gradients and
    re-raises. A LoRA run copies only its adapter; full fine-tuning copies the whole model.
    """
    tensors = [*_trained(optimizer), *extra]
    saved = [t.detach().clone() for t in tensors]
    saved_state = copy.deepcopy(optimizer.state_dict())
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for t, value in zip(tensors, saved):
                t.copy_(value)
        optimizer.load_state_dict(saved_state)
        optimizer.zero_grad(set_to_none=True)
        raise


def guarded_step(
    optimizer: torch.optim.Optimizer,
    named_params: list[tuple[str, torch.nn.Parameter]],
    loss: torch.Tensor,
    where: str,
    max_grad_norm: float | None = None,
) -> None:
    """``zero_grad``, ``backward``, clip, ``step``, refusing a non-finite loss, gradient, weight or
    moment (``NonFiniteUpdate``). Run it inside ``rollback`` so a refused step changes nothing."""
    check_loss(loss, where)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    check_gradients(named_params, where)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for _, p in named_params], max_grad_norm)
    optimizer.step()
    check_step(named_params, optimizer, where)
