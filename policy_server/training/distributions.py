"""Torch-side action distributions for the learners: log-probabilities and entropies with gradients.

The same distributions as ``policy_server.policies.distributions`` (numpy, for acting), written
in torch so a loss can differentiate through them. Shapes: B batch, n actions, d action dims.
Every function equals its ``torch.distributions`` counterpart (tests/training/test_action_distributions.py).
"""

from __future__ import annotations

import math

import torch

from policy_server.policies.spaces import ActionSpace, BoxSpace, DiscreteSpace, TupleSpace
from policy_server.policies.torch_policy import _as_heads

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def as_heads(out: object) -> list[torch.Tensor]:
    """A module's output as a list of heads: a tensor is one head, a tuple one head per element."""
    return _as_heads(out)


def categorical_log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` logits, ``(B,)`` int64 actions → ``(B,)`` log softmax(logits)[b, actions[b]]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` logits → ``(B,)`` entropy ``-sum p log p``."""
    # a -inf logit (a masked action) would give 0 * -inf = nan; torch's Categorical clamps too
    log_probs = torch.log_softmax(logits, dim=-1).clamp(min=torch.finfo(logits.dtype).min)
    return -(log_probs.exp() * log_probs).sum(-1)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density summed over dims: ``(B, d)``, ``(B, d)``, ``(B, d) | (d,) → (B,)``."""
    z = (x - mean) * torch.exp(-log_std)
    return (-0.5 * z**2 - log_std - LOG_SQRT_2PI).sum(-1)


def gaussian_entropy(mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian entropy summed over dims: ``(B, d)``, ``(B, d) | (d,) → (B,)``."""
    return (0.5 + LOG_SQRT_2PI + log_std.expand_as(mean)).sum(-1)


def log_prob_entropy(
    space: ActionSpace, heads: list[torch.Tensor], actions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``actions`` and entropy of the policy, both ``(B,)``.

    ``heads`` are the module's outputs (``as_heads``): logits ``(B, n)`` for a discrete space,
    one logits tensor per component for a tuple space (the joint log-probability and entropy
    are sums over the independent components), ``(mean, log_std)`` for a box. ``actions`` are
    int64 ``(B, k)`` (k = 1 for discrete) or float ``(B, d)`` for a box.
    """
    if isinstance(space, BoxSpace):
        mean, log_std = heads
        return gaussian_log_prob(actions, mean, log_std), gaussian_entropy(mean, log_std)
    if not isinstance(space, (DiscreteSpace, TupleSpace)):
        raise TypeError(f"no torch distribution for action space {space.kind!r}")
    if len(heads) != actions.shape[-1]:
        raise ValueError(f"{len(heads)} logits heads for actions of {actions.shape[-1]} components")
    log_prob = torch.stack([categorical_log_prob(lg, actions[:, i]) for i, lg in enumerate(heads)])
    entropy = torch.stack([categorical_entropy(lg) for lg in heads])
    return log_prob.sum(0), entropy.sum(0)
